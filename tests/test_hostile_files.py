"""Issue 11 without a server: the pure-torch loaders' messages for hostile files (JSON of the wrong shape, refused
pickles, per-model download hints). The same cases run end to end, per loader node, in tests/test_reliability.py."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from reliability_files import Payload  # noqa: E402

from waifukit import loading  # noqa: E402
from waifukit.loading import CheckpointError, read_json, read_state_dict  # noqa: E402
from waifukit.registry import fetch_hint  # noqa: E402


def test_json_that_is_not_an_object_is_refused_naming_the_file(tmp_path):
    """Issue 11.4: a config.json holding an array gave "'list' object has no attribute 'get'" with no file."""
    for text, kind in (("[1, 2]", "list"), ('"text"', "str"), ("3", "int"), ("null", "NoneType")):
        path = tmp_path / "config.json"
        path.write_text(text)
        with pytest.raises(CheckpointError) as e:
            read_json(path)
        assert str(path) in str(e.value) and f"JSON {kind}, not the JSON object" in str(e.value)
    path.write_bytes(b"\xff\xfe{")  # not UTF-8
    with pytest.raises(CheckpointError, match="unreadable JSON.*replace it"):
        read_json(path)
    path.write_text('{"a": 1}')  # control
    assert read_json(path) == {"a": 1}


def test_non_object_config_reaches_the_user_named(tmp_path):
    """Through a loader: the transformer/ config.json is an array."""
    folder = tmp_path / "transformer"
    folder.mkdir()
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"config\.json: holds a JSON list"):
        loading.resolve_linear_dit(tmp_path)


def test_tokenizer_config_that_is_not_an_object(tmp_path):
    from fixtures.tiny_tokenizer import build_xlmr_tokenizer
    from waifukit.mexma.tokenizer import XLMRTokenizer
    build_xlmr_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[]")
    with pytest.raises(ValueError, match="tokenizer_config.json.*holds a JSON list, not an object"):
        XLMRTokenizer.from_path(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")  # control
    XLMRTokenizer.from_path(tmp_path)


@pytest.mark.parametrize("ext,raw", [(".pth", False), (".ckpt", True), (".bin", False)])
def test_code_running_pickle_is_refused_in_our_words(tmp_path, ext, raw):
    """Issue 11.6: torch's refusal text (ANSI codes, advice to pass weights_only=False) was pasted to the user."""
    marker = tmp_path / "MARKER"
    path = tmp_path / f"evil{ext}"
    if raw:
        with open(path, "wb") as f:
            pickle.dump({"w": Payload(str(marker))}, f)
    else:
        torch.save({"w": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path, fetch_hint("sdxs"))
    msg = str(e.value)
    assert not marker.exists()
    assert msg.startswith(str(path)) and "holds code or objects other than tensors" in msg
    assert "never executes pickles" in msg and ".safetensors release" in msg and "AiArtLab/sdxs" in msg
    assert "\x1b[" not in msg and "weights_only=False" not in msg and "`False`" not in msg
    good = tmp_path / f"good{ext}"  # control: a plain state dict loads
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(read_state_dict(good)["w"], torch.ones(2))


def test_broken_pickle_says_download_again(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth: not a readable torch checkpoint .*empty, truncated"):
        read_state_dict(path)


def _resolvers():
    from waifukit.wuerstchen.clip_text import resolve_clip_text
    from waifukit.mexma.model import resolve_mexma
    from waifukit.wuerstchen.paella_vq import resolve_vqgan
    from waifukit.sdxs.unet import resolve_unet
    from waifukit.wuerstchen.decoder import resolve_decoder
    from waifukit.wuerstchen.prior import resolve_prior
    return [("waifu-2b", loading.resolve_linear_dit), ("waifu-2b", loading.resolve_vae),
            ("sdxs", lambda p: loading.resolve_vae(p, fetch_hint("sdxs"))), ("sdxs", resolve_unet),
            ("mexma-siglip", resolve_mexma), ("wuerstchen-prior", resolve_prior), ("wuerstchen", resolve_decoder),
            ("wuerstchen", resolve_vqgan),
            ("wuerstchen-prior", lambda p: resolve_clip_text(p, hint=fetch_hint("wuerstchen-prior")))]


@pytest.mark.parametrize("model,resolve", _resolvers(), ids=lambda x: x if isinstance(x, str) else "")
def test_corrupt_file_hint_names_the_loaders_model(tmp_path, model, resolve):
    """Issue 11.5: every loader's corrupt-file message ended with the waifu-2b hint."""
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError) as e:
        resolve(path)
    msg = str(e.value)
    assert str(path) in msg and f"weights fetch {model} --comfyui" in msg
    if model != "waifu-2b":  # control against the old message
        assert "waifu-2b" not in msg


def test_scheduler_config_that_is_not_an_object_is_named_once(tmp_path):
    """A snapshot's scheduler_config.json holding an array: one clear message naming it (the path was doubled)."""
    from fixtures.waifu_snapshot import _save_fp16, tiny_transformer
    dit = tiny_transformer()
    dit.save_config(tmp_path / "transformer")
    _save_fp16(dit, tmp_path / "transformer" / "diffusion_pytorch_model.fp16.safetensors")
    sched = tmp_path / "scheduler" / "scheduler_config.json"
    sched.parent.mkdir()
    sched.write_text("[1]")
    with pytest.raises(CheckpointError) as e:
        loading.resolve_linear_dit(tmp_path)
    assert str(e.value).count(str(sched)) == 1 and "holds a JSON list" in str(e.value)
    sched.write_text('{"shift": 3.0}')  # control
    assert loading.resolve_linear_dit(tmp_path).extra["shift"] == 3.0
