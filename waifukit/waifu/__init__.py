"""Waifu (AiArtLab/waifu-2b): the Sana-style Linear DiT (``dit.py``); its sampler loop is kernels.fused."""
