"""Upscaling and face restoration after decode: spandrel models, tiled (docs/upscale.md).

- `tiles.py`: the pure tiling: equal tiles, feathered blend, batches halved on out of memory
- `models.py`: loading with spandrel (restricted unpickler for .pth), dtype, tile size, passes
- `faces.py`: detect (YuNet) → align (5 landmarks → FFHQ template) → restore → paste back
- `stage.py`: `PostStage`, what an image job's `upscale`/`face_restore` and an upscale job run
"""
