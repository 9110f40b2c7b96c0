"""Model registry, pipelines and sampling: the only package that imports torch and diffusers.

Read it top down:
  engine.py       the Engine: checks a batch, picks the model, runs the loop; one per worker process
  loop/           the denoising loop and its rows (per-row scheduler, generator, start, blend)
  conditioning/   what a row is conditioned on: text embeddings, image latents (VAE in and out)
  stages/         pictures in: img2img, inpaint and outpaint preprocessing, paste-back
  models/         registry, loading, the model cache, samplers, tiny test fixtures
  speed/          optional levers: compile, gated attention, guarded VAE decode, DeepCache, GPU metrics

Importing this package, `genserve.engine.models` (with `models.registry`) or `genserve.engine.errors`
stays torch-free so the API server can use them; the ML stack loads with everything else.
"""

from genserve.logs import silence_library_noise

silence_library_noise()  # before anything below imports diffusers
