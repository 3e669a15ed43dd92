"""Pure-torch core of comfyui-waifu: models, samplers and loaders, importable without ComfyUI."""
