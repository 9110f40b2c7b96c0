"""The denoising loop: one model call per step for every row of a batch, each row with its own state."""
