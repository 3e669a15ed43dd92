"""Hostile model files for the reliability suite (tests/test_reliability.py): every kind of bad file, for every
loader node, written into a ComfyUI models/ folder next to the good tiny checkpoints.

``build(models, marker)`` returns the cases as (loader node, input name, value, what) and the good value per
loader. Pickles carry a payload that would create ``marker`` if anything ever unpickled them unsafely.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Loader node -> (models/ folder, the input naming the file, the registry model its fetch hint must name,
# the good file or folder relative to models/ (copied from the installed snapshots below)).
SINGLE = {
    "LinearDiTLoader": ("diffusion_models", "unet_name", "waifu-2b", "diffusers/waifu-2b/transformer"),
    "SDXSUNetLoader": ("diffusion_models", "unet_name", "sdxs", "diffusers/sdxs/unet"),
    "WuerstchenStageCLoader": ("diffusion_models", "unet_name", "wuerstchen-prior", "diffusers/wuerstchen-prior/prior"),
    "WuerstchenStageBLoader": ("diffusion_models", "unet_name", "wuerstchen", "diffusers/wuerstchen/decoder"),
    "WuerstchenStageALoader": ("vae", "vae_name", "wuerstchen", "diffusers/wuerstchen/vqgan"),
    "AuraVAE16Loader": ("vae", "vae_name", "waifu-2b", "diffusers/waifu-2b/vae"),
    "MexmaSigLIPLoader": ("text_encoders", "text_encoder_name", "mexma-siglip", "diffusers/sdxs/text_encoder"),
}
# Snapshot loader -> (its snapshot under models/diffusers, the main component, the registry model).
SNAPSHOTS = {
    "WaifuSnapshotLoader": ("waifu-2b", "transformer", "waifu-2b"),
    "SDXSSnapshotLoader": ("sdxs", "unet", "sdxs"),
    "WuerstchenPriorLoader": ("wuerstchen-prior", "prior", "wuerstchen-prior"),
    "WuerstchenDecoderLoader": ("wuerstchen", "decoder", "wuerstchen"),
}
# A file of another family for each loader (the wrong-family case).
OTHER = {"LinearDiTLoader": "diffusers/waifu-2b/vae", "SDXSUNetLoader": "diffusers/waifu-2b/transformer",
         "WuerstchenStageCLoader": "diffusers/wuerstchen/decoder", "WuerstchenStageBLoader": "diffusers/sdxs/unet",
         "WuerstchenStageALoader": "diffusers/waifu-2b/vae", "AuraVAE16Loader": "diffusers/wuerstchen/vqgan",
         "MexmaSigLIPLoader": "diffusers/waifu-2b/transformer", "WaifuSnapshotLoader": "diffusers/waifu-2b/vae",
         "SDXSSnapshotLoader": "diffusers/waifu-2b/transformer", "WuerstchenPriorLoader": "diffusers/wuerstchen/decoder",
         "WuerstchenDecoderLoader": "diffusers/wuerstchen-prior/prior"}


class Payload:
    """Unpickling this runs ``open(marker, "w")``: the file must never appear."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def weights_in(folder: Path) -> Path:
    return next(p for p in sorted(folder.iterdir()) if p.suffix == ".safetensors")


def wrong_shapes(src: Path, dst: Path):
    """Every key right, one tensor (the largest) with a different shape."""
    sd = load_file(str(src))
    key = max(sd, key=lambda k: sd[k].numel())
    sd[key] = torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:], dtype=sd[key].dtype)
    save_file(sd, str(dst))


def offsets_out_of_range(dst: Path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 1 << 30]}}).encode()
    dst.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)


def write_pickles(folder: Path, marker: str, stem: str) -> list[str]:
    names = []
    for ext, raw in ((".pth", False), (".ckpt", True), (".bin", False)):
        path = folder / f"{stem}{ext}"
        if raw:  # a plain pickle, as old .ckpt files are
            with open(path, "wb") as f:
                pickle.dump({"state_dict": {"w": Payload(marker)}}, f)
        else:  # torch's zip format with the payload inside
            torch.save({"w": Payload(marker)}, path)
        names.append(path.name)
    return names


def generic(folder: Path, marker: str, rng) -> list[tuple[str, str]]:
    """(file name, what) of the bad files any loader of this folder must refuse."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bad-zero.safetensors").write_bytes(b"")
    (folder / "bad-random.safetensors").write_bytes(rng.randbytes(4096))
    (folder / "bad-header-2e40.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    offsets_out_of_range(folder / "bad-offsets.safetensors")
    (folder / "bad-zero.pth").write_bytes(b"")
    (folder / "bad-random.ckpt").write_bytes(rng.randbytes(4096))
    cases = [("bad-zero.safetensors", "zero bytes"), ("bad-random.safetensors", "random bytes"),
             ("bad-header-2e40.safetensors", "header length 2**40"), ("bad-offsets.safetensors", "data offsets out of range"),
             ("bad-zero.pth", "zero-byte pickle"), ("bad-random.ckpt", "random-byte pickle")]
    cases += [(n, "code-running pickle") for n in write_pickles(folder, marker, "bad-payload")]
    return cases


def variant(src: Path, dst: Path) -> Path:
    """A copy of a snapshot made of hard links; change files only through ``replace``."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def replace(path: Path, data: bytes | None):
    """Swap a (hard-linked) file for new bytes, or delete it (None), without touching the original."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if data is not None:
        path.write_bytes(data)


def build(models: Path, marker: str):
    """Write every bad file; returns (cases, good) where cases are (loader, input, value, what) and good maps each
    loader to a value it loads."""
    import random
    rng = random.Random(11)
    cases, good = [], {}
    done_folders = {}
    for loader, (kind, inp, _, src) in SINGLE.items():
        folder = models / kind
        if kind not in done_folders:
            done_folders[kind] = generic(folder, marker, rng)
        cases += [(loader, inp, name, what) for name, what in done_folders[kind]]
        src_w = weights_in(models / src)
        stem = loader.lower()
        shutil.copy(src_w, folder / f"{stem}.safetensors")
        data = src_w.read_bytes()
        (folder / f"{stem}-truncated.safetensors").write_bytes(data[: len(data) // 2])
        wrong_shapes(src_w, folder / f"{stem}-shapes.safetensors")
        shutil.copy(weights_in(models / OTHER[loader]), folder / f"{stem}-family.safetensors")
        cases += [(loader, inp, f"{stem}-truncated.safetensors", "truncated"),
                  (loader, inp, f"{stem}-shapes.safetensors", "right keys, wrong shapes"),
                  (loader, inp, f"{stem}-family.safetensors", "wrong family")]
        # Single files that need their config beside them as <name>.json get the loader's own (so what is wrong
        # with each bad file is the file itself).
        if (models / src / "config.json").is_file():
            for name in ("", "-truncated", "-shapes", "-family"):
                shutil.copy(models / src / "config.json", folder / f"{stem}{name}.json")
        good[loader] = f"{stem}.safetensors"
    # Sidecar files the single-file loaders read.
    dm, te = models / "diffusion_models", models / "text_encoders"
    sdxs = models / "diffusers" / "sdxs"
    for suffix, src in ((".json", "unet/config.json"), (".scheduler.json", "scheduler/scheduler_config.json")):
        shutil.copy(sdxs / src, dm / f"sdxsunetloader{suffix}")
    for case, cfg, sched in (("nocfg", None, b"ok"), ("cfg-nonjson", b"{not json", b"ok"),
                             ("cfg-array", b"[1, 2, 3]", b"ok"), ("sched-array", b"ok", b"[]")):
        shutil.copy(dm / "sdxsunetloader.safetensors", dm / f"sdxs-{case}.safetensors")
        for suffix, data, src in ((".json", cfg, "unet/config.json"),
                                  (".scheduler.json", sched, "scheduler/scheduler_config.json")):
            if data == b"ok":
                shutil.copy(sdxs / src, dm / f"sdxs-{case}{suffix}")
            elif data is not None:
                (dm / f"sdxs-{case}{suffix}").write_bytes(data)
        cases.append(("SDXSUNetLoader", "unet_name", f"sdxs-{case}.safetensors", case.replace("-", " ")))
    shutil.copytree(sdxs / "tokenizer", te / "mexmasigliploader_tokenizer")
    shutil.copy(te / "mexmasigliploader.safetensors", te / "mexma-notokenizer.safetensors")
    cases.append(("MexmaSigLIPLoader", "text_encoder_name", "mexma-notokenizer.safetensors", "missing tokenizer"))
    tok_cfg = te / "mexma-tokcfg-array_tokenizer"
    shutil.copytree(sdxs / "tokenizer", tok_cfg)
    replace(tok_cfg / "tokenizer_config.json", b"[]")
    shutil.copy(te / "mexmasigliploader.safetensors", te / "mexma-tokcfg-array.safetensors")
    cases.append(("MexmaSigLIPLoader", "text_encoder_name", "mexma-tokcfg-array.safetensors", "non-object tokenizer config"))

    for loader, (snap, comp, _) in SNAPSHOTS.items():
        src = models / "diffusers" / snap
        good[loader] = snap
        main = weights_in(src / comp)

        def make(case, *changes):
            dst = variant(src, models / "diffusers" / f"bad-{snap}-{case}")
            for rel, data in changes:
                replace(dst / rel, data)
            cases.append((loader, "snapshot", dst.name, case.replace("-", " ")))

        w = f"{comp}/{main.name}"
        data = main.read_bytes()
        make("zero-weights", (w, b""))
        make("truncated", (w, data[: len(data) // 2]))
        make("wrong-family", (w, weights_in(models / OTHER[loader]).read_bytes()))
        make("config-nonjson", (f"{comp}/config.json", b"\xff\xfe not json"))
        make("config-array", (f"{comp}/config.json", b"[]"))
        make("config-missing", (f"{comp}/config.json", None))
        make("scheduler-array", ("scheduler/scheduler_config.json", b"[1]"))
        make("tokenizer-missing", ("tokenizer", None))
        dst = variant(src, models / "diffusers" / f"bad-{snap}-pickle")
        replace(dst / w, None)
        write_pickles(dst / comp, marker, "diffusion_pytorch_model")
        for extra in ("diffusion_pytorch_model.ckpt", "diffusion_pytorch_model.bin"):
            replace(dst / comp / extra, None)  # one weights file, so the loader picks the .pth
        cases.append((loader, "snapshot", dst.name, "code-running pickle"))
    return cases, good
