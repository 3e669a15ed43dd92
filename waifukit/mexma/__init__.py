"""MEXMA-SigLIP: the XLM-R text tower (``xlmr.py``), its tokenizer (``tokenizer.py``), and the text projector,
SigLIP vision tower, pooled encoders and layout resolver (``model.py``)."""
