"""genserve: a self-hosted image generation server for Stable Diffusion-family models."""

__version__ = "0.1.0"
