"""Reading checkpoints safely, and resolving the published Waifu layouts to (params, state dict).

Layouts: the AiArtLab/waifu-2b snapshot folder (transformer/, text_encoder/, tokenizer/, vae/, scheduler/,
``*.fp16.safetensors``), single files, and the original Sana layout (.safetensors or a .pth loaded with
``weights_only=True``). Nothing here touches the network. Every failure is a ``CheckpointError`` naming the
file and the fix.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from .flow import FlowScheduleConfig
from .registry import FETCH_HINT

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and what to do."""


_HEADERS_ONLY: ContextVar[bool] = ContextVar("waifukit_headers_only", default=False)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


@contextmanager
def headers_only():
    """Within this block every weights file is read for its key names, shapes and dtypes only: tensors come back
    on the meta device (safetensors headers; pickles mapped to meta), so full-size checkpoints can be resolved
    and checked without reading or allocating their data."""
    token = _HEADERS_ONLY.set(True)
    try:
        yield
    finally:
        _HEADERS_ONLY.reset(token)


def _read_safetensors_header(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {sl.get_dtype()}")
            out[key] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
    return out


def _numpy_array_globals() -> list:
    """What torch's weights-only unpickler must additionally accept to read plain numpy arrays, and nothing more.

    recoilme/waifu's ``save_checkpoint`` (diffusion/utils/checkpoint.py) stores ``np.random.get_state()`` beside
    the state dict; its pickle names ``numpy.core.multiarray._reconstruct`` (numpy 1; numpy 2 writes
    ``numpy._core.multiarray._reconstruct``), ``numpy.ndarray`` and ``numpy.dtype``. Those rebuild an array from
    raw bytes; none runs code. The dtype instances are BUILT (``__setstate__``), so their concrete classes are
    listed too, numeric and bool ones only. Every other global (os.system, builtins.eval, ...) stays refused by
    weights_only."""
    try:
        import numpy as np
    except ImportError:  # no numpy, no numpy arrays to read
        return []
    reconstruct = np.ndarray(0).__reduce__()[0]  # the installed numpy's _reconstruct, whatever its module
    allowed = [(reconstruct, "numpy.core.multiarray._reconstruct"),
               (reconstruct, "numpy._core.multiarray._reconstruct"),
               (np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for code in "?bBhHiIlLqQefdgFDG":
        cls = type(np.dtype(code))
        allowed.append((cls, f"{cls.__module__}.{cls.__qualname__}"))
    return allowed


def read_state_dict(path: Path, hint: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a weights file; ``hint`` (registry.fetch_hint of the model the caller loads) ends the
    messages that call for a fresh download."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found. {hint}".rstrip())
    suffix = path.suffix.lower()
    if is_shard_index(path):
        return read_sharded(path, hint)
    if suffix in SAFE_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return _read_safetensors_header(path) if _HEADERS_ONLY.get() else load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is probably truncated "
                                  f"or corrupt: download it again. {hint}".rstrip()) from None
    if suffix in PICKLE_SUFFIXES:
        try:
            meta = _HEADERS_ONLY.get()
            with torch.serialization.safe_globals(_numpy_array_globals()):
                obj = torch.load(str(path), map_location="meta" if meta else "cpu", weights_only=True, mmap=meta)
        except Exception as e:  # weights_only refuses arbitrary pickles; anything else is a bad file
            raise CheckpointError(pickle_refusal(path, e, hint)) from None
        for key in ("state_dict", "model", "module", "ema"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
            raise CheckpointError(f"{path}: does not hold a state dict of tensors")
        return obj
    raise CheckpointError(f"{path}: unsupported file type {suffix!r}; expected .safetensors (or .pth/.ckpt, or a "
                          f"sharded checkpoint's *.safetensors.index.json)")


def pickle_refusal(path: Path, error: Exception, hint: str) -> str:
    """Our words for a .pth/.ckpt/.bin that torch.load(weights_only=True) refused: torch's own text carries ANSI
    codes and advises weights_only=False, which would run the file's code."""
    import pickle
    import re
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f" (it asks for {found.group(1)})" if found else ""
        return (f"{path}: refused: this pickle file holds code or objects other than tensors{what}, or is not a "
                f"torch checkpoint at all. comfyui-waifu never executes pickles (it reads them weights-only, with "
                f"torch.load(weights_only=True)). Use the model's .safetensors release instead. {hint}").rstrip()
    return (f"{path}: not a readable torch checkpoint ({type(error).__name__}: the file is empty, truncated or "
            f"corrupt); download the model's .safetensors release instead. {hint}").rstrip()


def read_json(path: Path) -> dict:
    """A JSON object from a model folder (every config, tokenizer and index file we read is one)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: unreadable JSON ({e}); replace it with the file from the model's "
                              "published snapshot") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not the JSON object (name: value "
                              "pairs) this file must be; replace it with the file from the model's published snapshot")
    return data


# Weight file names in preference order: the published snapshot ships the fp16 variants. Each single file is
# followed by the index of the same checkpoint saved in shards (save_pretrained over max_shard_size); diffusers
# and transformers name a variant's index "<name>.safetensors.index.<variant>.json" and its shards
# "<name>.<variant>-0000N-of-0000M.safetensors" (diffusers/utils/hub_utils.py _add_variant, models/modeling_utils.py
# save_pretrained). Pickled twins (.bin) come last: a .safetensors beside them always wins.
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors.index.fp16.json",
                 "model.safetensors", "model.safetensors.index.json",
                 "model.fp16.safetensors", "model.safetensors.index.fp16.json")
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.(?P<ext>safetensors|bin)$")


def is_shard_index(path: Path) -> bool:
    name = Path(path).name
    return name.endswith(".json") and ".index" in name and (".safetensors.index" in name or ".bin.index" in name)


def read_sharded(index: Path, hint: str = "") -> dict[str, torch.Tensor]:
    """A sharded checkpoint through its index: every shard the index names must exist, and every indexed key must
    be in exactly the shard the index names, once; a shard holding keys the index does not list is refused too
    (a mixed-up folder, e.g. shards of two saves)."""
    index = Path(index)
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: not a sharded-checkpoint index (no weight_map). Download it again.")
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (index.parent / name).is_file()]
    if missing:
        raise CheckpointError(f"{index}: lists shard(s) that are not in {index.parent}: {', '.join(missing)}. "
                              f"Download the missing shard(s). {hint}".rstrip())
    out: dict[str, torch.Tensor] = {}
    for name in shards:
        path = index.parent / name
        if is_shard_index(path):
            raise CheckpointError(f"{index}: shard {name} is itself an index")
        part = read_state_dict(path, hint)
        stray = [k for k in part if weight_map.get(k) != name]
        twice = [k for k in part if k in out]
        if twice:
            raise CheckpointError(f"{path}: holds key(s) another shard already gave (e.g. {twice[:3]}); the shards "
                                  f"do not belong together. Download the checkpoint again.")
        if stray:
            raise CheckpointError(f"{path}: holds key(s) that {index.name} does not place in this shard (e.g. "
                                  f"{stray[:3]}); the shards and the index do not belong together. Download again.")
        out.update(part)
    absent = [k for k in weight_map if k not in out]
    if absent:
        raise CheckpointError(f"{index}: {len(absent)} indexed key(s) are in none of the shards (e.g. {absent[:3]}); "
                              f"a shard is truncated or from another save. Download the checkpoint again.")
    return out


def index_of_shard(path: Path, hint: str = "") -> Optional[Path]:
    """The index json that lists a shard file (so picking any shard loads the whole checkpoint), or None."""
    path = Path(path)
    m = _SHARD.match(path.name)
    if not m:
        return None
    for index in sorted(path.parent.glob("*.index*.json")):
        if is_shard_index(index):
            try:
                if path.name in set(read_json(index).get("weight_map", {}).values()):
                    return index
            except (CheckpointError, AttributeError):
                continue
    raise CheckpointError(f"{path}: is one shard of a sharded checkpoint, but no *.index.json beside it lists it. "
                          f"Download the index file with the shards. {hint}".rstrip())


def find_weights(folder: Path, hint: str = "") -> Path:
    """The weights of a component folder: a single file or a shard index (read_state_dict reads both)."""
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    indexes = [p for p in sorted(folder.glob("*.json")) if is_shard_index(p)]
    listed = set()
    for index in indexes:
        wm = read_json(index)
        wm = wm.get("weight_map") if isinstance(wm, dict) else None
        listed |= set(wm.values()) if isinstance(wm, dict) else set()
    safe = [p for p in sorted(folder.glob("*.safetensors")) if p.name not in listed]
    pickles = [p for p in sorted(folder.iterdir()) if p.suffix in PICKLE_SUFFIXES and p.name not in listed]
    found = safe + indexes or pickles  # a .safetensors (or index) beside a pickle wins; the pickle is never read
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(f"{folder}: no weights file (expected one of {', '.join(_WEIGHT_NAMES)}). {hint}".rstrip())
    if any(_SHARD.match(p.name) for p in found):
        raise CheckpointError(f"{folder}: sharded weights ({', '.join(p.name for p in found if _SHARD.match(p.name))}) "
                              f"without the *.safetensors.index.json that lists them: download it too. {hint}".rstrip())
    raise CheckpointError(f"{folder}: several weight files ({', '.join(p.name for p in found)}); keep one")


def load_component(path: Path, sub: str, hint: str = "") -> tuple[dict, Optional[dict], Path]:
    """(state dict, config.json or None, weights file) for a file, a component folder or a snapshot root;
    ``hint`` says where the model the caller loads is published (registry.fetch_hint)."""
    path = Path(path)
    if path.is_dir():
        folder = path / sub if (path / sub).is_dir() else path
        weights = find_weights(folder, hint)
    else:
        folder, weights = path.parent, index_of_shard(path, hint) or path
    cfg_path = folder / "config.json"
    # A config.json only counts when it sits in a component folder (the snapshot layout), not beside
    # unrelated single files in models/<kind>/.
    cfg = read_json(cfg_path) if cfg_path.is_file() and (path.is_dir() or weights.parent.name == sub) else None
    return read_state_dict(weights, hint), cfg, weights


def convert_layout(fn, sd, weights: Path, family: str):
    try:
        return fn(sd)
    except ValueError as e:
        raise CheckpointError(f"{weights}: not a {family} checkpoint: {e}. Pick the right file for this loader.") from None


@dataclass
class Resolved:
    params: object
    state_dict: dict
    source: Path
    extra: dict = field(default_factory=dict)


def resolve_linear_dit(path: Path) -> Resolved:
    from .waifu.dit import LinearDiTParams, to_sana_layout
    sd, cfg, weights = load_component(path, "transformer", FETCH_HINT)
    sd = convert_layout(to_sana_layout, sd, weights, "Waifu/Sana Linear DiT")
    if not cfg and weights.parent.name == "transformer" and (weights.parent.parent / "model_index.json").is_file():
        # save_pretrained always writes it: a snapshot without it is an incomplete download, and the head counts
        # would otherwise be inferred from the published head size (single files keep that documented inference).
        raise CheckpointError(f"{weights.parent / 'config.json'}: missing, so this snapshot's transformer "
                              f"architecture is not pinned down; the download is incomplete. {FETCH_HINT}")
    try:
        params = LinearDiTParams.from_diffusers_config(cfg) if cfg else LinearDiTParams.infer(sd)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{weights}: unsupported transformer config: {e}") from None
    shift = None
    snapshot = weights.parent.parent if weights.parent.name == "transformer" else None
    if snapshot is not None and (snapshot / "scheduler" / "scheduler_config.json").is_file():
        sched = snapshot / "scheduler" / "scheduler_config.json"
        sched_cfg = read_json(sched)  # its own errors name the file already
        try:
            shift = FlowScheduleConfig.from_scheduler_config(sched_cfg).shift
        except ValueError as e:
            raise CheckpointError(f"{sched}: {e}") from None
    return Resolved(params, sd, weights, {"shift": shift})


def find_tokenizer(weights: Path) -> Path:
    """Where the tokenizer of a text-encoder file sits. The file's own tokenizer comes first
    (``<stem>.tokenizer.json``, ``<stem>_tokenizer/``, then its folder's ``tokenizer/`` or ``tokenizer.json``);
    only a snapshot component folder (``text_encoder/``) falls back to its snapshot's ``tokenizer/``. A folder
    like ``models/text_encoders/<name>/`` never borrows ``models/text_encoders/tokenizer/``: that belongs to
    another model."""
    folder, stem = weights.parent, weights.name.split(".")[0]
    candidates = [folder / f"{stem}.tokenizer.json", folder / f"{stem}_tokenizer", folder / "tokenizer", folder]
    if folder.name == "text_encoder":
        candidates.append(folder.parent / "tokenizer")
    for c in candidates:
        if (c.is_file() and c.suffix == ".json") or (c.is_dir() and (c / "tokenizer.json").is_file()):
            return c
    return candidates[-1]  # the tokenizer loader then names what is missing


def resolve_vae(path: Path, hint: str = FETCH_HINT) -> Resolved:
    """The 16-channel VAE; it ships in both waifu-2b and sdxs, so the caller's hint names which."""
    from .vae16.autoencoder import AutoencoderKLParams, check_latent_channels, to_native_layout
    sd, cfg, weights = load_component(path, "vae", hint)
    sd = convert_layout(to_native_layout, sd, weights, "16-channel AutoencoderKL VAE")
    try:
        params = AutoencoderKLParams.infer(sd)
        if cfg:
            # The config gives what weights cannot (scaling, group count); the weights decide which optional
            # blocks exist: a config.json without mid_block_add_attention means "True" to diffusers, while the
            # 16ch VAE's weights may have no mid-block attention at all.
            found = {k: getattr(params, k) for k in ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv")}
            params = replace(AutoencoderKLParams.from_diffusers_config(cfg), **found)
        check_latent_channels(params, expected=16, source=str(weights))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{weights}: {e}") from None
    return Resolved(params, sd, weights)


def is_waifu_snapshot(folder: Path) -> bool:
    return all((folder / sub).is_dir() for sub in ("transformer", "text_encoder", "vae"))


def load_strict(module: torch.nn.Module, sd: dict, source: Path) -> None:
    """Load every tensor, refusing missing/unexpected keys and shape mismatches with the file named."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if bad:
            parts.append(f"shape mismatches (e.g. {bad[:3]})")
        raise CheckpointError(f"{source}: weights do not fit the model: {'; '.join(parts)}. It is another model's "
                              "file or a damaged one: pick the file this loader is for, or download it again")
    module.load_state_dict(sd, strict=True)
