"""comfyui-waifu: native Waifu (AiArtLab) text-to-image nodes for ComfyUI.

The node layer is imported only inside a ComfyUI host, so the pure-torch core (waifukit) stays importable and
testable on its own.
"""
import logging

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

try:
    import comfy  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    comfy = None

if comfy is not None:
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    except Exception:
        logging.exception("comfyui-waifu: the node layer failed to import; no nodes registered")
        raise

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
