"""The thin ComfyUI layer: node declarations that call into ..waifukit. One module per model family; each
exports NODES = {node id: (class, display name)}. Core is reached only through core_api."""
import logging

from . import core_api

_drift = core_api.check_surface()
if _drift:  # before an image is wrong: say which core names changed on this host
    logging.warning("comfyui-waifu: ComfyUI %s differs from the versions this pack is tested on (%s) in:\n  %s",
                    core_api.host_version(), ", ".join(core_api.SUPPORTED), "\n  ".join(_drift))

from . import mexma, sdxs, vae16, waifu, wuerstchen  # noqa: E402

NODES = {}
for _module in (waifu, mexma, vae16, sdxs, wuerstchen):
    NODES.update(_module.NODES)

NODE_CLASS_MAPPINGS = {key: cls for key, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for key, (_, name) in NODES.items()}
