"""The thin ComfyUI layer: node declarations that call into ..waifukit. One module per model family; each
exports NODES = {node id: (class, display name)}."""
from . import mexma, sdxs, vae16, waifu, wuerstchen

NODES = {}
for _module in (waifu, mexma, vae16, sdxs, wuerstchen):
    NODES.update(_module.NODES)

NODE_CLASS_MAPPINGS = {key: cls for key, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for key, (_, name) in NODES.items()}
