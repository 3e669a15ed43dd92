"""The models this pack knows, in one place. Loaders never download: they point users here."""

# ComfyUI folder each component goes to, per model id. weights_manifest.json holds files and sizes.
MODELS = {
    "waifu-2b": {
        "hf_repo": "AiArtLab/waifu-2b",
        "family": "waifu",
        "comfy_folder": "diffusers/waifu-2b",
        "default_shift": 3.0,
        "default_steps": 20,
        "default_cfg": 4.5,
    },
    "sdxs": {
        "hf_repo": "AiArtLab/sdxs",
        "family": "sdxs",
        "comfy_folder": "diffusers/sdxs",
        "default_steps": 40,
        "default_cfg": 5.5,
    },
    "mexma-siglip": {
        "hf_repo": "visheratin/mexma-siglip",
        "family": "mexma",
        "comfy_folder": "text_encoders/mexma-siglip",
    },
    "wuerstchen-prior": {
        "hf_repo": "warp-ai/wuerstchen-prior",
        "family": "wuerstchen",
        "comfy_folder": "diffusers/wuerstchen-prior",
        # The repo also holds a .bin pickle twin of every model (3.97 / 4.22 GB): fetch only what we load.
        "hf_include": "'*.json' '*.txt' '*.safetensors'",
        "default_steps": 29,
        "default_cfg": 4.0,
    },
    "wuerstchen": {
        "hf_repo": "warp-ai/wuerstchen",
        "family": "wuerstchen",
        "comfy_folder": "diffusers/wuerstchen",
        # The repo also holds a .bin pickle twin of every model (3.97 / 4.22 GB): fetch only what we load.
        "hf_include": "'*.json' '*.txt' '*.safetensors'",
        "default_steps": 12,
        "default_cfg": 0.0,
    },
}


def fetch_hint(model_id: str) -> str:
    """The exact command lines that fetch ``model_id`` (the weights CLI, and huggingface-cli when we know the
    repo). Loaders put this in every missing-file error; they never download themselves."""
    hint = (f"Get the weights with (from ComfyUI/custom_nodes/comfyui-waifu): "
            f"python -m waifukit weights fetch {model_id} --comfyui /path/to/ComfyUI")
    model = MODELS.get(model_id)
    if model:
        hint += (f"; or: huggingface-cli download {model['hf_repo']} "
                 f"--local-dir ComfyUI/models/{model['comfy_folder']}")
        if model.get("hf_include"):
            hint += f" --include {model['hf_include']}"
    return hint


FETCH_HINT = fetch_hint("waifu-2b")

# Waifu trained on 64-px aspect buckets with sides 384..768 (ASPECT_RATIO_512 in recoilme/waifu
# diffusion/data/datasets/utils.py); offer every such size,
# squarest first within each aspect ratio.
BUCKET_SIDES = range(384, 769, 64)
WAIFU_BUCKETS = sorted(((w, h) for w in BUCKET_SIDES for h in BUCKET_SIDES), key=lambda wh: (wh[0] / wh[1], wh[0]))


def bucket_label(w: int, h: int) -> str:
    from math import gcd
    g = gcd(w, h)
    return f"{w}x{h} ({w // g}:{h // g})"
