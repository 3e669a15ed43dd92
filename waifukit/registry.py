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
}

FETCH_HINT = ("Get the weights with: huggingface-cli download AiArtLab/waifu-2b "
              "--local-dir ComfyUI/models/diffusers/waifu-2b")

# Waifu trained on 64-px aspect buckets with sides 384..768 (research note C); offer every such size,
# squarest first within each aspect ratio.
BUCKET_SIDES = range(384, 769, 64)
WAIFU_BUCKETS = sorted(((w, h) for w in BUCKET_SIDES for h in BUCKET_SIDES), key=lambda wh: (wh[0] / wh[1], wh[0]))


def bucket_label(w: int, h: int) -> str:
    from math import gcd
    g = gcd(w, h)
    return f"{w}x{h} ({w // g}:{h // g})"
