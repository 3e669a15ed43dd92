"""Würstchen v2: Stage C prior (``prior.py``), Stage B decoder (``decoder.py``), Stage A Paella VQGAN
(``paella_vq.py``), their shared blocks (``common.py``), the DDPM sampler (``sched.py``) and the CLIP text
encoders (``clip_text.py``)."""
