"""Captioned-image data: the formats (folder, webdataset, hf, latents), the latent cache and downloads."""
