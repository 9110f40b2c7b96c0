"""Speed levers, each optional and measured: compile, gated attention, guarded VAE decode, DeepCache."""
