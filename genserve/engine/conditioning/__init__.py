"""What a row is conditioned on: text embeddings, and image latents through the VAE."""
