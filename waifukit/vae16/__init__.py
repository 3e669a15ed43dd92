"""The AuraDiffusion 16-channel VAE (an AutoencoderKL, ``autoencoder.py``) that Waifu and SDXS decode with."""
