"""XLM-RoBERTa text tower of MEXMA-SigLIP (the Waifu text encoder), in pure torch.

Provenance: written from the architecture of transformers' ``XLMRobertaModel``
(transformers/models/xlm_roberta/modeling_xlm_roberta.py, BERT/RoBERTa post-LN encoder); parameter
names follow its state dict so checkpoints load without renaming. Output is the per-token
``last_hidden_state`` [B, L, H]; the pooler is not built (Waifu uses the token states).
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import TorchOps


@dataclass
class XLMRobertaParams:
    vocab_size: int = 250002
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"XLMRobertaParams.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary ({self.vocab_size})")
        if self.max_position_embeddings <= self.pad_token_id + 1:
            raise ValueError("max_position_embeddings must exceed pad_token_id + 1 (positions start after it)")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @property
    def max_tokens(self) -> int:
        """Longest sequence the position table covers (512 for XLM-R: positions start at pad+1)."""
        return self.max_position_embeddings - self.pad_token_id - 1

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "XLMRobertaParams":
        """From a transformers ``config.json`` dict (XLMRobertaConfig keys)."""
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":  # "gelu" = exact erf GELU; other activations are not implemented
            raise ValueError(f"unsupported hidden_act {act!r}: only 'gelu' (exact erf) is implemented")
        pos = cfg.get("position_embedding_type", "absolute")
        if pos not in (None, "absolute"):
            raise ValueError(f"unsupported position_embedding_type {pos!r}: only 'absolute' is implemented")
        if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
            raise ValueError("decoder / cross-attention XLM-R configs are not supported (text encoder only)")
        d = cls()
        return cls(
            vocab_size=cfg.get("vocab_size", d.vocab_size),
            hidden_size=cfg.get("hidden_size", d.hidden_size),
            num_layers=cfg.get("num_hidden_layers", d.num_layers),
            num_heads=cfg.get("num_attention_heads", d.num_heads),
            intermediate_size=cfg.get("intermediate_size", d.intermediate_size),
            max_position_embeddings=cfg.get("max_position_embeddings", d.max_position_embeddings),
            type_vocab_size=cfg.get("type_vocab_size", d.type_vocab_size),
            layer_norm_eps=cfg.get("layer_norm_eps", d.layer_norm_eps),
            pad_token_id=cfg.get("pad_token_id", d.pad_token_id) if cfg.get("pad_token_id") is not None
            else d.pad_token_id,
        )

    @classmethod
    def infer(cls, sd: dict) -> "XLMRobertaParams":
        """From tensor shapes of a state dict (any layout ``to_native_layout`` accepts).

        Not recoverable from shapes, so fixed: num_heads = hidden // 64 (every XLM-R size - base,
        large, XL, XXL - uses 64-dim heads), layer_norm_eps = 1e-5, pad_token_id = 1."""
        sd = to_native_layout(sd)
        vocab, hidden = sd["embeddings.word_embeddings.weight"].shape
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
        if hidden % 64:
            raise ValueError(f"hidden size {hidden} is not a multiple of 64: cannot infer the head count")
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=max(layers) + 1,
            num_heads=hidden // 64,
            intermediate_size=sd["encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=sd["embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=sd["embeddings.token_type_embeddings.weight"].shape[0],
        )


# ----------------------------------------------------------------------------- state-dict layout

_WRAPPERS = ("text_model.", "roberta.", "model.", "transformer.")
_BODY = re.compile(r"(embeddings\.|encoder\.layer\.\d+\.|pooler\.)")
# Not part of the text tower: MEXMA-SigLIP's projector / vision tower / contrastive scalars, MLM head.
_EXTRAS = re.compile(r"(text_projector\.|vision_model\.|vision_projector\.|logit_scale$|logit_bias$|lm_head\.)")
_DROP = ("pooler.", "embeddings.position_ids", "embeddings.token_type_ids")
_FAMILIES = (
    (re.compile(r"(^|\.)transformer_blocks\.|(^|\.)blocks\.\d+\.attn\.qkv"), "a Sana/Waifu diffusion transformer"),
    (re.compile(r"(^|\.)decoder\.up_blocks\.|(^|\.)decoder\.up\."), "a VAE"),
    (re.compile(r"(^|\.)text_model\.encoder\.layers\.|^encoder\.layers\.\d+\.self_attn\."), "a CLIP text encoder"),
    (re.compile(r"(^|\.)encoder\.block\.\d+\."), "a T5 encoder"),
)


def _strip_wrappers(key: str):
    """Key without wrapper prefixes when what follows is part of the XLM-R body (or an extra)."""
    rest = key
    while True:
        if _BODY.match(rest):
            return rest, "body"
        if _EXTRAS.match(rest):
            return rest, "extra"
        for w in _WRAPPERS:
            if rest.startswith(w):
                rest = rest[len(w):]
                break
        else:
            return key, "unknown"


def to_native_layout(sd: dict) -> dict:
    """Transformers ``XLMRobertaModel`` keys (optionally under ``text_model.`` / ``roberta.`` /
    ``model.`` / ``transformer.``, e.g. a MEXMA-SigLIP single file) -> this module's keys.

    Drops the pooler, the position_ids/token_type_ids buffers and MEXMA-SigLIP's non-text parts;
    raises ValueError when the dict is not an XLM-R text encoder. Idempotent."""
    out, unknown = {}, []
    for key, value in sd.items():
        native, kind = _strip_wrappers(key)
        if kind == "unknown":
            unknown.append(key)
            continue
        if kind == "extra" or native.startswith(_DROP):
            continue
        if native in out:
            raise ValueError(f"state dict holds two XLM-R text towers (duplicate key {native!r} from {key!r})")
        out[native] = value
    if "embeddings.word_embeddings.weight" not in out or "encoder.layer.0.intermediate.dense.weight" not in out:
        raise ValueError(_not_xlmr_message(sd, unknown))
    return out


def _not_xlmr_message(sd: dict, unknown: list) -> str:
    if not sd:
        return "not an XLM-RoBERTa text encoder: the state dict is empty"
    for pattern, family in _FAMILIES:
        if any(pattern.search(k) for k in sd):
            return (f"not an XLM-RoBERTa text encoder: this looks like {family}. Load the MEXMA-SigLIP "
                    f"text encoder (XLM-R large: embeddings.* / encoder.layer.N.* keys) here instead")
    sample = ", ".join(list(unknown or sd)[:5])
    return ("not an XLM-RoBERTa text encoder: expected embeddings.word_embeddings.weight and "
            f"encoder.layer.N.* keys (optionally under text_model./roberta./model.); first keys: {sample}")


# ----------------------------------------------------------------------------- modules


class _Embeddings(nn.Module):
    def __init__(self, p: XLMRobertaParams, dtype, device, ops):
        super().__init__()
        self.padding_idx = p.pad_token_id
        self.word_embeddings = ops.Embedding(p.vocab_size, p.hidden_size, padding_idx=p.pad_token_id,
                                             dtype=dtype, device=device)
        self.position_embeddings = ops.Embedding(p.max_position_embeddings, p.hidden_size,
                                                 padding_idx=p.pad_token_id, dtype=dtype, device=device)
        self.token_type_embeddings = ops.Embedding(p.type_vocab_size, p.hidden_size, dtype=dtype, device=device)
        self.LayerNorm = ops.LayerNorm(p.hidden_size, eps=p.layer_norm_eps, dtype=dtype, device=device)

    def forward(self, input_ids):
        # RoBERTa positions: real tokens count up from padding_idx + 1, pads sit on padding_idx
        # (computed from the ids, not from the attention mask, exactly as transformers does).
        real = input_ids.ne(self.padding_idx).long()
        position_ids = torch.cumsum(real, dim=1) * real + self.padding_idx
        # Token-type ids are all 0 (a single segment): add row 0 of the table.
        token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, p, dtype, device, ops):
        super().__init__()
        self.num_heads = p.num_heads
        self.query = ops.Linear(p.hidden_size, p.hidden_size, bias=True, dtype=dtype, device=device)
        self.key = ops.Linear(p.hidden_size, p.hidden_size, bias=True, dtype=dtype, device=device)
        self.value = ops.Linear(p.hidden_size, p.hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, x, bias):
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return out.transpose(1, 2).reshape(b, n, -1)


class _DenseNorm(nn.Module):
    """dense -> (+ residual) -> LayerNorm: the post-LN output of both sub-blocks."""

    def __init__(self, d_in, d_out, eps, dtype, device, ops):
        super().__init__()
        self.dense = ops.Linear(d_in, d_out, bias=True, dtype=dtype, device=device)
        self.LayerNorm = ops.LayerNorm(d_out, eps=eps, dtype=dtype, device=device)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, p, dtype, device, ops):
        super().__init__()
        self.self = _SelfAttention(p, dtype, device, ops)
        self.output = _DenseNorm(p.hidden_size, p.hidden_size, p.layer_norm_eps, dtype, device, ops)

    def forward(self, x, bias):
        return self.output(self.self(x, bias), x)


class _Intermediate(nn.Module):
    def __init__(self, p, dtype, device, ops):
        super().__init__()
        self.dense = ops.Linear(p.hidden_size, p.intermediate_size, bias=True, dtype=dtype, device=device)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact erf GELU (hidden_act "gelu")


class _Layer(nn.Module):
    def __init__(self, p, dtype, device, ops):
        super().__init__()
        self.attention = _Attention(p, dtype, device, ops)
        self.intermediate = _Intermediate(p, dtype, device, ops)
        self.output = _DenseNorm(p.intermediate_size, p.hidden_size, p.layer_norm_eps, dtype, device, ops)

    def forward(self, x, bias):
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, p, dtype, device, ops):
        super().__init__()
        self.layer = nn.ModuleList([_Layer(p, dtype, device, ops) for _ in range(p.num_layers)])


class XLMRobertaTextModel(nn.Module):
    """``forward(input_ids [B, L] long, attention_mask [B, L] (1 real / 0 pad) or None)
    -> last_hidden_state [B, L, H]``. Keys match ``to_native_layout`` output."""

    def __init__(self, params: XLMRobertaParams = None, dtype=None, device=None, operations=None):
        super().__init__()
        self.params = params = params or XLMRobertaParams()
        ops = operations or TorchOps
        self.embeddings = _Embeddings(params, dtype, device, ops)
        self.encoder = _Encoder(params, dtype, device, ops)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor = None) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.params.max_tokens:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds the position table "
                             f"({self.params.max_tokens}); tokenize with max_length <= {self.params.max_tokens}")
        x = self.embeddings(input_ids)
        bias = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            # Additive key mask [B, 1, 1, L]: padded keys get the dtype's most negative value, as in
            # transformers, so they receive ~0 weight; padded queries still attend to real tokens.
            keep = attention_mask.to(device=x.device).bool()[:, None, None, :]
            bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
            bias = bias.masked_fill(~keep, torch.finfo(x.dtype).min)
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x
