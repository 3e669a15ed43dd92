"""SDXS (AiArtLab/sdxs): the UNet conditioned on the pooled, projected MEXMA-SigLIP vector (``unet.py``)."""
