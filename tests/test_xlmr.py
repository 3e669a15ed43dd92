"""MEXMA-SigLIP text tower (XLM-R) and its tokenizer vs transformers.

Bounds: fp32 last_hidden_state, max rel err <= 1e-4 against transformers' XLMRobertaModel (sdpa);
tokenizer ids and masks identical to transformers' AutoTokenizer (padding="max_length", 512).
"""
import dataclasses
import os

import pytest
import torch

from tests.fixtures.tiny_tokenizer import build_xlmr_tokenizer
from tests.helpers import max_rel_err, randomize_
from waifukit.mexma.tokenizer import XLMRTokenizer
from waifukit.mexma.xlmr import XLMRobertaParams, XLMRobertaTextModel, to_native_layout

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a girl with an umbrella standing in the rain, anime style, highly detailed",
    "Девушка с зонтиком под дождём",
    "一只可爱的猫在花园里",
    "雨の中で傘をさしている女の子、アニメ風",
    "",
    "Ein Mädchen mit einem Regenschirm, 비 오는 날",
    " ".join(["masterpiece, best quality, a castle on a hill at sunset"] * 80),  # > 512 tokens
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("xlmr_tok")
    build_xlmr_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def batch(tok_dir):
    return XLMRTokenizer.from_path(tok_dir)(PROMPTS, max_length=512)


def _hf_model(vocab, hidden=64, layers=2, heads=4, inter=128, seed=0):
    cfg = transformers.XLMRobertaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    model = transformers.XLMRobertaModel(cfg).eval()  # default add_pooling_layer=True
    randomize_(model, seed=seed, std=0.05)
    return cfg, model


def _ours(params, sd, dtype=torch.float32):
    model = XLMRobertaTextModel(params, dtype=dtype).eval()
    model.load_state_dict({k: v.to(dtype) for k, v in to_native_layout(sd).items()}, strict=True)
    return model


# ----------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_is_deterministic_xlmr(tmp_path, tok_dir):
    vocab = build_xlmr_tokenizer(tmp_path)
    assert 800 <= vocab <= 1000
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(tok_dir, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(hf).__name__ == "XLMRobertaTokenizer"
    assert [hf.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, vocab - 1]


def test_tokenizer_matches_transformers(tok_dir, batch):
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    ref = hf(PROMPTS, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    ids, mask = batch
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (len(PROMPTS), 512)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    # one at a time as well (batching must not change anything), from the file path itself
    single = XLMRTokenizer.from_path(os.path.join(tok_dir, "tokenizer.json"))
    for i, text in enumerate(PROMPTS):
        one_ids, one_mask = single([text])
        assert torch.equal(one_ids[0], ids[i]) and torch.equal(one_mask[0], mask[i])
    # sanity on the edge cases: "" -> <s></s>; the long prompt is cut to 512 ending with </s>
    assert ids[4, :3].tolist() == [0, 2, 1] and mask[4].sum() == 2
    assert mask[-1].sum() == 512 and ids[-1, 0] == 0 and ids[-1, -1] == 2
    assert (ids[mask == 0] == 1).all()
    assert not (ids[:4] == 3).any()  # the test prompts are covered by the tiny vocabulary


def test_missing_or_corrupt_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        XLMRTokenizer.from_path(tmp_path / "nowhere")
    msg = str(e.value)
    assert "tokenizer.json" in msg and "nowhere" in msg and "waifu-2b" in msg
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        XLMRTokenizer.from_path(tmp_path)  # existing folder without the file
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        XLMRTokenizer.from_path(tmp_path)


# ----------------------------------------------------------------------------- model


def test_model_matches_transformers_fp32(tok_dir, batch):
    ids, mask = batch
    vocab_size = XLMRTokenizer.from_path(tok_dir).tokenizer.get_vocab_size()  # incl. <mask>
    cfg, hf = _hf_model(vocab_size)
    sd = hf.state_dict()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        params = XLMRobertaParams.from_hf_config(cfg.to_dict())
        out = _ours(params, sd)(ids, mask)
    assert out.shape == ref.shape == (len(PROMPTS), 512, 64)
    assert max_rel_err(out, ref) <= 1e-4

    # infer(): everything from shapes but the head count, which it takes as hidden // 64
    inferred = XLMRobertaParams.infer(sd)
    assert inferred.num_heads == 1 and dataclasses.replace(inferred, num_heads=4) == params

    # MEXMA-SigLIP single-file style: text tower under text_model. plus parts to drop
    mexma = {f"text_model.{k}": v for k, v in sd.items()}
    mexma.update({
        "text_model.embeddings.position_ids": torch.arange(514)[None],
        "text_projector.weight": torch.zeros(8, 64),
        "vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 4, 4),
        "vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8),
        "logit_scale": torch.zeros(1), "logit_bias": torch.zeros(1),
    })
    native = to_native_layout(mexma)
    assert set(native) == set(to_native_layout(sd)) and not any(k.startswith("pooler.") for k in native)
    assert XLMRobertaParams.infer(mexma) == inferred
    with torch.no_grad():
        out2 = _ours(params, mexma)(ids, mask)
    assert max_rel_err(out2, ref) <= 1e-4


def test_infer_with_64_dim_heads_matches(batch):
    ids, mask = batch
    cfg, hf = _hf_model(1000, hidden=128, layers=1, heads=2, inter=256, seed=1)
    sd = {f"roberta.{k}": v for k, v in hf.state_dict().items()}  # MLM-checkpoint style prefix
    params = XLMRobertaParams.infer(sd)
    assert params == XLMRobertaParams.from_hf_config(cfg.to_dict())
    with torch.no_grad():
        ref = hf(input_ids=ids[:3], attention_mask=mask[:3]).last_hidden_state
        out = _ours(params, sd)(ids[:3], mask[:3])
    assert max_rel_err(out, ref) <= 1e-4


def test_padding_does_not_change_real_tokens_and_half_precision(batch):
    ids, mask = batch
    cfg, hf = _hf_model(1000, seed=2)
    sd = hf.state_dict()
    params = XLMRobertaParams.from_hf_config(cfg.to_dict())
    model = _ours(params, sd)
    n = int(mask[1].sum())
    with torch.no_grad():
        padded = model(ids[1:2], mask[1:2])[0, :n]
        unpadded = model(ids[1:2, :n], None)[0]
        assert max_rel_err(padded, unpadded) <= 1e-5
        ref = model(ids[:3], mask[:3])
        for dtype in (torch.bfloat16, torch.float16):
            half = _ours(params, sd, dtype)
            assert half.dtype == dtype
            out = half(ids[:3], mask[:3])
            assert out.dtype == dtype and torch.isfinite(out).all()
            assert max_rel_err(out, ref) <= 5e-2


def test_prompt_length_encoding_equals_512_padded(tok_dir, batch):
    """The encoder's prompt-length path (pad_to_longest: tensors end at the longest prompt, nodes/mexma_host.py)
    gives the 512-padded encoding's ids/mask (sliced) and, in fp32, its per-token states of every real token and its
    <s> state (the pooled vector's input) within max rel err 1e-5; a changed prompt is far outside that bound."""
    tok = XLMRTokenizer.from_path(tok_dir)
    prompts = PROMPTS[:6]
    ids, mask = tok(prompts, max_length=512, pad_to_longest=True)
    n = int(batch[1][:6].sum(1).max())
    assert ids.shape == (6, n) and n < 40
    assert torch.equal(ids, batch[0][:6, :n]) and torch.equal(mask, batch[1][:6, :n])
    assert (batch[1][:6, n:] == 0).all()
    one_ids, _ = tok([""], pad_to_longest=True)
    assert one_ids.tolist() == [[0, 2]]
    long_ids, long_mask = tok(PROMPTS, max_length=512, pad_to_longest=True)
    assert long_ids.shape == (len(PROMPTS), 512)  # the > 512-token prompt is still cut at 512

    cfg, hf = _hf_model(1000, seed=3)
    model = _ours(XLMRobertaParams.from_hf_config(cfg.to_dict()), hf.state_dict())
    with torch.no_grad():
        padded = model(batch[0][:6], batch[1][:6])
        short = model(ids, mask)
        real = mask.bool()
        err = max_rel_err(short[real], padded[:, :n][real])
        assert err <= 1e-5, err
        assert max_rel_err(short[:, 0], padded[:, 0]) <= 1e-5
        # control: another prompt in row 0 moves its states far past the bound
        other_ids, other_mask = tok([prompts[1]] + prompts[1:], pad_to_longest=True)
        moved = model(other_ids, other_mask)
        assert max_rel_err(moved[0, :2], padded[0, :2]) > 1e-2


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("sd, expected", [
    ({"transformer_blocks.0.attn1.to_q.weight": torch.zeros(1), "caption_projection.linear_1.weight": torch.zeros(1)},
     "Sana/Waifu diffusion transformer"),
    ({"blocks.3.attn.qkv.weight": torch.zeros(1)}, "Sana/Waifu diffusion transformer"),
    ({"decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(1), "encoder.conv_in.weight": torch.zeros(1)}, "a VAE"),
    ({"decoder.up.0.block.0.conv1.weight": torch.zeros(1)}, "a VAE"),
    ({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(1),
      "text_model.embeddings.token_embedding.weight": torch.zeros(1)}, "CLIP text encoder"),
    ({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(1), "shared.weight": torch.zeros(1)}, "T5 encoder"),
    ({}, "empty"),
    ({"foo.bar": torch.zeros(1)}, "foo.bar"),
])
def test_wrong_family_is_rejected(sd, expected):
    with pytest.raises(ValueError, match="not an XLM-RoBERTa text encoder") as e:
        to_native_layout(sd)
    assert expected in str(e.value)
    with pytest.raises(ValueError):
        XLMRobertaParams.infer(sd)


def test_bad_config_is_rejected():
    good = transformers.XLMRobertaConfig().to_dict()
    with pytest.raises(ValueError, match="hidden_act"):
        XLMRobertaParams.from_hf_config({**good, "hidden_act": "gelu_new"})
    with pytest.raises(ValueError, match="position_embedding_type"):
        XLMRobertaParams.from_hf_config({**good, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="divisible"):
        XLMRobertaParams(hidden_size=100, num_heads=16)
    assert XLMRobertaParams().max_tokens == 512
    model = XLMRobertaTextModel(XLMRobertaParams(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2,
                                                 intermediate_size=8, max_position_embeddings=10))
    with pytest.raises(ValueError, match="position table"):
        model(torch.zeros(1, 9, dtype=torch.long))
