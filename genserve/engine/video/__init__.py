"""Video: families and segment plans, frame interpolation, stitching, post-processing, metrics and encoding."""
