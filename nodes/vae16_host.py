"""ComfyUI glue for the 16-channel VAE: a ComfyUI ``VAE`` (native_vae.NativeVAE) around our native AutoencoderKL,
so stock VAEDecode / VAEEncode / VAEDecodeTiled accept it."""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path

import torch


from ..waifukit import loading
from ..waifukit.preview import fit_latent_rgb
from ..waifukit.vae16.autoencoder import AutoencoderKL
from .common import pick_dtype
from .native_vae import WORKING_DTYPES, NativeVAE
from .core_api import LatentFormat, folder_paths, mm


class AuraVAE(NativeVAE):
    """The native AutoencoderKL as a ComfyUI VAE (pixels in [-1, 1], 8x), with an fp16 overflow guard."""

    WORKING_DTYPES = WORKING_DTYPES

    def __init__(self, module: AutoencoderKL, latent_channels: int, source: Path, dtype):
        # Core's AutoencoderKL estimates, so model management budgets our decode like its own.
        super().__init__(module, latent_channels=latent_channels, ratio=8, source=source, dtype=dtype,
                         to_model=lambda image: image * 2.0 - 1.0,
                         from_model=lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0),
                         encode_bytes=1767, decode_bytes=2178 * 64)

    def _decode(self, z):
        out = super()._decode(z)
        if self.vae_dtype == torch.float16 and torch.isnan(out).any():
            # fp16 activations of the 16ch VAE can overflow on some latents: redo this decode in fp32.
            logging.warning("comfyui-waifu: fp16 VAE decode overflowed (NaN); decoding again in fp32")
            self.vae_dtype = torch.float32
            self.first_stage_model.to(torch.float32)
            try:
                out = super()._decode(z)
            finally:
                self.vae_dtype = torch.float16
                self.first_stage_model.to(torch.float16)
        return out


# Preview factors per VAE file, fitted once and kept in the user directory (no table to copy: neither
# city96/ComfyUI_ExtraModels nor its Efficient-Large-Model fork gives Sana latents a preview).
# In memory they are keyed by the latent scaling (scale, shift) they were fitted for, which is what a model's
# latent format knows.
PREVIEW_FACTORS: dict = {}


class Latent16(LatentFormat):
    """The 16-channel VAE's latents in model space: (raw - shift) * scale. Waifu was trained on a plain 0.18215
    (no shift, the default); SDXS takes both from its snapshot's vae/config.json. Previews use factors fitted from
    the loaded VAE itself (preview_factors), not a copied table."""
    latent_channels = 16

    def __init__(self, scale_factor: float = 0.18215, shift_factor: float = 0.0):
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor + self.shift_factor

    def _fitted(self):
        return PREVIEW_FACTORS.get((self.scale_factor, self.shift_factor))

    @property
    def latent_rgb_factors(self):
        fitted = self._fitted()
        return fitted and fitted["factors"]

    @property
    def latent_rgb_factors_bias(self):
        fitted = self._fitted()
        return fitted and fitted["bias"]


def _preview_cache_path() -> str:
    return os.path.join(folder_paths.get_user_directory(), "comfyui-waifu", "latent_rgb_factors.json")


def _usable(entry, channels: int) -> bool:
    """A cache entry as preview_factors writes it: ``channels`` RGB rows and an RGB bias, all finite numbers."""
    def rgb(row):
        return (isinstance(row, list) and len(row) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                 and math.isfinite(v) for v in row))
    return (isinstance(entry, dict) and isinstance(entry.get("factors"), list) and len(entry["factors"]) == channels
            and all(rgb(r) for r in entry["factors"]) and rgb(entry.get("bias")))


def _read_cache(path: str) -> dict:
    """The cache file's entries; a missing file is empty, a damaged one is refitted (with a warning)."""
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logging.warning("comfyui-waifu: preview-factor cache %s is damaged (%s); fitting the factors again", path, e)
        return {}
    if not isinstance(cache, dict):
        logging.warning("comfyui-waifu: preview-factor cache %s holds a JSON %s, not an object; fitting the factors "
                        "again", path, type(cache).__name__)
        return {}
    return cache


def _write_cache(path: str, key: str, entry: dict) -> None:
    """Add one entry. Several ComfyUI processes may share user/: each writes its own temp file and renames it over
    the cache (atomic), so a reader sees the old or the new file, never a mix; at worst a concurrent entry is lost
    and refitted later."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cache = _read_cache(path)
        cache[key] = entry
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
    except OSError as e:  # a read-only user dir only costs a refit next time
        logging.info("comfyui-waifu: could not cache preview factors: %s", e)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def preview_factors(vae: AuraVAE, params) -> dict:
    """{"factors", "bias"} mapping model-space latents to preview RGB, derived from this VAE file."""
    st = os.stat(vae.source)
    key = f"{os.path.abspath(vae.source)}|{st.st_size}|{int(st.st_mtime)}"
    path = _preview_cache_path()
    entry = _read_cache(path).get(key)
    if entry is not None and not _usable(entry, params.latent_channels):
        logging.warning("comfyui-waifu: preview-factor cache %s has a damaged entry for %s; fitting it again",
                        path, vae.source)
        entry = None
    if entry is None:
        module = vae.first_stage_model
        device = next(module.parameters()).device
        factors, bias = fit_latent_rgb(module.decode, params.latent_channels, params.scaling_factor,
                                       params.shift_factor or 0.0, device=device, dtype=vae.vae_dtype)
        entry = {"factors": factors, "bias": bias}
        _write_cache(path, key, entry)
    PREVIEW_FACTORS[(float(params.scaling_factor), float(params.shift_factor or 0.0))] = entry
    return entry


def load_vae(path: Path, dtype_choice: str = "auto", hint: str = loading.FETCH_HINT) -> AuraVAE:
    res = loading.resolve_vae(path, hint)
    module = AutoencoderKL(res.params, dtype=torch.float32)
    loading.load_strict(module, res.state_dict, res.source)
    device = mm.vae_device()
    dtype = pick_dtype(dtype_choice, device, lambda: mm.vae_dtype(device, AuraVAE.WORKING_DTYPES))
    vae = AuraVAE(module, res.params.latent_channels, res.source, dtype)
    try:
        preview_factors(vae, res.params)
    except Exception as e:  # previews are a convenience; never fail a load over them
        logging.warning("comfyui-waifu: no latent preview factors for %s: %s", res.source, e)
    return vae
