"""Native CLIP text encoder vs transformers' CLIPTextModel (fp32, max relative error <= 1e-4 on
last_hidden_state and every hidden state, with the tokenizer's attention mask), and our tokenizer vs
transformers' CLIPTokenizer loaded from the same folder (ids and mask identical)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fixtures.clip_tokenizer import build_clip_tokenizer
from fixtures.wuerstchen_snapshot import tiny_clip_text
from helpers import max_rel_err
from waifukit.wuerstchen.clip_text import CLIPTextModel, CLIPTextParams, CLIPTokenizer, resolve_clip_text, to_native_layout
from waifukit.loading import CheckpointError

BOUND = 1e-4
PROMPTS = ["an image of a shiba inu, donning a spacesuit and helmet", "", "  Hello   WORLD!!  naïve café ",
           "城市的夜景 ネオン 도시", "it's 12:30, <|endoftext|> ok", "a " * 120, "Würstchen\tund\nBrezeln"]


@pytest.fixture(scope="module", params=[("<|endoftext|>", True), ("!", False)], ids=["eot-pad+json", "bang-pad+vocab"])
def tok_dir(request, tmp_path_factory):
    pad, tj = request.param
    d = tmp_path_factory.mktemp("tok")
    build_clip_tokenizer(d, pad_token=pad, write_tokenizer_json=tj)
    return d


def test_tokenizer_matches_transformers(tok_dir):
    from transformers import CLIPTokenizer as HFTok
    ref = HFTok.from_pretrained(tok_dir)
    ours = CLIPTokenizer.from_path(tok_dir)
    enc = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, mask = ours(PROMPTS)
    assert torch.equal(ids, enc.input_ids)
    assert torch.equal(mask, enc.attention_mask)
    assert ours.pad_token_id == ref.pad_token_id


def test_missing_tokenizer_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError):
        CLIPTokenizer.from_path(tmp_path)


@pytest.mark.parametrize("hidden,act", [(128, "gelu"), (64, "quick_gelu")])
@torch.no_grad()
def test_text_model_parity(tok_dir, hidden, act):
    vocab = len(CLIPTokenizer.from_path(tok_dir).tokenizer.get_vocab())
    ref = tiny_clip_text(vocab, hidden, 3)
    ref.config.hidden_act = act
    from transformers import CLIPTextModel as HF
    ref = HF(ref.config).eval()
    from fixtures.wuerstchen_snapshot import _randomize
    _randomize(ref, 4, 0.1)
    params = CLIPTextParams.from_hf_config(ref.config.to_dict())
    ours = CLIPTextModel(params).eval()
    ours.load_state_dict(to_native_layout({"text_model." + k: v for k, v in ref.state_dict().items()}), strict=True)
    ids, mask = CLIPTokenizer.from_path(tok_dir)(PROMPTS)
    out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    last, states = ours(ids, mask, output_hidden_states=True)
    assert max_rel_err(last, out.last_hidden_state) <= BOUND
    for a, b in zip(states, out.hidden_states):
        assert max_rel_err(a, b) <= BOUND
    # The mask matters for the padded positions (what the Würstchen pipelines feed on): without it they differ.
    assert max_rel_err(ours(ids), out.last_hidden_state) > 1e-3


def test_resolve_from_file_and_wrong_family(tmp_path, tok_dir):
    vocab = len(CLIPTokenizer.from_path(tok_dir).tokenizer.get_vocab())
    te = tiny_clip_text(vocab, 64, 5)
    save_file({"text_model." + k: v.contiguous() for k, v in te.state_dict().items()}, str(tmp_path / "te.safetensors"))
    # Defect 6: heads/activation/eps are not in the weights; the old loader guessed them (dim // 64, gelu).
    with pytest.raises(CheckpointError) as e:
        resolve_clip_text(tmp_path / "te.safetensors", tokenizer=tok_dir)
    assert str(tmp_path / "te.json") in str(e.value) and "text_encoder/config.json" in str(e.value)
    te.config.to_json_file(tmp_path / "te.json")
    with pytest.raises(CheckpointError, match="tokenizer"):
        resolve_clip_text(tmp_path / "te.safetensors")
    params, sd, _, tok = resolve_clip_text(tmp_path / "te.safetensors", tokenizer=tok_dir)
    assert params == CLIPTextParams.from_hf_config(te.config.to_dict())
    assert params.hidden_size == 64 and params.num_hidden_layers == 2
    save_file({"blocks.0.depthwise.weight": torch.zeros(1), "cond_mapper.0.weight": torch.zeros(1)},
              str(tmp_path / "prior.safetensors"))
    with pytest.raises(CheckpointError, match="Stage C prior"):
        resolve_clip_text(tmp_path / "prior.safetensors", tokenizer=tok_dir)


def test_text_encoder_folder_uses_its_own_tokenizer(tmp_path, tok_dir):
    """Issue 10 defect 7 (CLIP side): models/text_encoders/<name>/ with its own vocab.json + merges.txt must not
    take the sibling models/text_encoders/tokenizer/ (another model's)."""
    import shutil
    vocab = len(CLIPTokenizer.from_path(tok_dir).tokenizer.get_vocab())
    own = tmp_path / "text_encoders" / "bigG"
    shutil.copytree(tok_dir, own)
    shutil.copytree(tok_dir, tmp_path / "text_encoders" / "tokenizer")
    te = tiny_clip_text(vocab, 64, 5)
    save_file({"text_model." + k: v.contiguous() for k, v in te.state_dict().items()}, str(own / "model.safetensors"))
    te.config.to_json_file(own / "model.json")
    tok = resolve_clip_text(own / "model.safetensors")[3]
    assert tok.source == str(own), tok.source
