"""Batch rendering: specs of N prompts x variants, expanded into de-duplicated jobs, with manifests."""
