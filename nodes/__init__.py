"""The thin ComfyUI layer: node declarations that call into ..waifukit."""
from .waifu import NODES as _WAIFU

NODES = {**_WAIFU}
NODE_CLASS_MAPPINGS = {key: cls for key, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for key, (_, name) in NODES.items()}
