"""Pictures in: img2img, inpainting and outpainting turn a request and its pictures into rows."""
