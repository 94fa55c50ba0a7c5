"""Captioned-image data: the formats (folder, webdataset, hf, latents), the latent cache, downloads and the demo's
synthetic set."""
