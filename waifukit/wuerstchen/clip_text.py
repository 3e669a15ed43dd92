"""CLIP text encoder (transformers ``CLIPTextModel``) and its byte-level BPE tokenizer, pure torch + ``tokenizers``.

Provenance: architecture from transformers (5.x) ``models/clip/modeling_clip.py``; tokenizer pipeline from
``models/clip/tokenization_clip.py`` (read, not copied). Used by Würstchen v2: the prior snapshot ships
CLIP-ViT-bigG text (32 layers, 1280), the decoder snapshot CLIP-ViT-H text (24 layers, 1024); both pipelines use
``last_hidden_state`` (after the final LayerNorm) with the tokenizer's attention mask applied on top of the
causal mask, prompts padded to 77 with the tokenizer's pad token.

Parameter names are transformers' without the ``text_model.`` prefix that published files carry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..loading import CheckpointError, read_json
from ..ops import TorchOps

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


# transformers ``CLIPTextConfig`` defaults (models/clip/configuration_clip.py); tests/test_clip_text.py checks
# them against the installed transformers.
TRANSFORMERS_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5)


@dataclass
class CLIPTextParams:
    vocab_size: int = 49408
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 20
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP config: unsupported hidden_act {self.hidden_act!r} (known: {sorted(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP config: hidden_size {self.hidden_size} not divisible by "
                             f"{self.num_attention_heads} heads")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CLIP config: {name} must be positive")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "CLIPTextParams":
        if "text_config" in cfg and "hidden_size" not in cfg:  # a full CLIPModel config
            cfg = cfg["text_config"]
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") not in (None, "clip_text_model", "clip") or \
                any(not a.startswith("CLIP") for a in archs):
            raise ValueError(f"config.json describes {archs or cfg.get('model_type')}, not a CLIP text model")
        # A field the file leaves out takes transformers' CLIPTextConfig default (OpenAI ViT-B sizes,
        # quick_gelu), as CLIPTextConfig.from_pretrained would, never our bigG defaults.
        return cls(**{k: cfg.get(k, TRANSFORMERS_DEFAULTS[k]) for k in TRANSFORMERS_DEFAULTS})


class _Embeddings(nn.Module):
    def __init__(self, p: CLIPTextParams, operations, dtype, device):
        super().__init__()
        self.token_embedding = operations.Embedding(p.vocab_size, p.hidden_size, dtype=dtype, device=device)
        self.position_embedding = operations.Embedding(p.max_position_embeddings, p.hidden_size, dtype=dtype,
                                                       device=device)


class _Attention(nn.Module):
    def __init__(self, p: CLIPTextParams, operations, dtype, device):
        super().__init__()
        d = p.hidden_size
        self.heads = p.num_attention_heads
        self.q_proj = operations.Linear(d, d, dtype=dtype, device=device)
        self.k_proj = operations.Linear(d, d, dtype=dtype, device=device)
        self.v_proj = operations.Linear(d, d, dtype=dtype, device=device)
        self.out_proj = operations.Linear(d, d, dtype=dtype, device=device)

    def forward(self, x, mask):
        b, n, d = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _MLP(nn.Module):
    def __init__(self, p: CLIPTextParams, operations, dtype, device):
        super().__init__()
        self.act = ACTIVATIONS[p.hidden_act]
        self.fc1 = operations.Linear(p.hidden_size, p.intermediate_size, dtype=dtype, device=device)
        self.fc2 = operations.Linear(p.intermediate_size, p.hidden_size, dtype=dtype, device=device)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, p: CLIPTextParams, operations, dtype, device):
        super().__init__()
        self.self_attn = _Attention(p, operations, dtype, device)
        self.layer_norm1 = operations.LayerNorm(p.hidden_size, eps=p.layer_norm_eps, dtype=dtype, device=device)
        self.mlp = _MLP(p, operations, dtype, device)
        self.layer_norm2 = operations.LayerNorm(p.hidden_size, eps=p.layer_norm_eps, dtype=dtype, device=device)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, p, operations, dtype, device):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(p, operations, dtype, device) for _ in range(p.num_hidden_layers)])


class CLIPTextModel(nn.Module):
    def __init__(self, params: CLIPTextParams, operations=TorchOps, dtype=None, device=None):
        super().__init__()
        self.params = params
        self.embeddings = _Embeddings(params, operations, dtype, device)
        self.encoder = _Encoder(params, operations, dtype, device)
        self.final_layer_norm = operations.LayerNorm(params.hidden_size, eps=params.layer_norm_eps, dtype=dtype,
                                                     device=device)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_hidden_states: bool = False):
        """input_ids [B,L] -> last_hidden_state [B,L,D] (after final_layer_norm). With
        ``output_hidden_states`` also the list of per-layer states (embeddings first, pre-final-norm), as
        transformers' ``hidden_states``."""
        b, n = input_ids.shape
        if n > self.params.max_position_embeddings:
            raise ValueError(f"CLIP takes at most {self.params.max_position_embeddings} tokens, got {n}")
        emb = self.embeddings
        x = emb.token_embedding(input_ids) + emb.position_embedding(torch.arange(n, device=input_ids.device))[None]
        # Causal mask, and padding keys masked out where the tokenizer's mask says so (bos is never masked,
        # so no row is empty).
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x, allowed)
            states.append(x)
        out = self.final_layer_norm(x)
        return (out, states) if output_hidden_states else out


def to_native_layout(sd: dict) -> dict:
    """transformers layouts (``text_model.`` prefix or not, CLIPModel with a vision tower, position_ids
    buffer) -> our keys. ValueError if this is not a CLIP text tower."""
    for prefix in ("text_model.", "model.text_model.", "clip_model.text_model."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids") and not k.startswith("text_projection")}
    if "embeddings.token_embedding.weight" not in sd or "encoder.layers.0.self_attn.q_proj.weight" not in sd:
        from .common import describe_checkpoint
        raise ValueError(f"this is {describe_checkpoint(sd)}, not a transformers CLIP text model")
    return sd


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

def _token_str(value, default):
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


class CLIPTokenizer:
    """``tok(texts, max_length=77) -> (input_ids, attention_mask)`` LongTensors [B, max_length]:
    ``<|startoftext|>`` + up to max_length-2 tokens + ``<|endoftext|>``, right-padded with the pad token.

    Built on ``tokenizers`` with the pipeline transformers 5's CLIPTokenizer builds around the vocabulary and
    merges (NFC, whitespace runs -> one space, lower-case; CLIP's split regex; byte-level; BPE with "</w>")."""

    def __init__(self, vocab: dict, merges: list, bos: str = "<|startoftext|>", eos: str = "<|endoftext|>",
                 pad: str = "<|endoftext|>", unk: str = "<|endoftext|>", source: str = "<memory>"):
        from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE
        self.source = source
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                                       r"""[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        # The specials must never be split by BPE.
        from tokenizers import AddedToken
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys((bos, eos, pad, unk))])
        self.tokenizer = tok
        ids = {name: vocab.get(t) for name, t in (("bos", bos), ("eos", eos), ("pad", pad))}
        missing = [n for n, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{source}: special tokens {missing} are not in the vocabulary; not a CLIP tokenizer")
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids["bos"], ids["eos"], ids["pad"]

    @classmethod
    def from_path(cls, path: Path) -> "CLIPTokenizer":
        """A tokenizer folder (tokenizer.json, or vocab.json + merges.txt; tokenizer_config.json /
        special_tokens_map.json for the special tokens) or a tokenizer.json file."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        tj = path if path.is_file() else folder / "tokenizer.json"
        if tj.is_file():
            spec = read_json(tj)
            model = spec.get("model", {})
            if model.get("type") != "BPE":
                raise CheckpointError(f"{tj}: a {model.get('type')} tokenizer, not CLIP's byte-level BPE")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = read_json(folder / "vocab.json")
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#version")]
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json and no vocab.json + merges.txt")
        specials = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                specials.update({k: v for k, v in read_json(folder / name).items()
                                 if k in ("bos_token", "eos_token", "pad_token", "unk_token") and v is not None})
        kw = {short: _token_str(specials.get(f"{short}_token"), default) for short, default in
              (("bos", "<|startoftext|>"), ("eos", "<|endoftext|>"), ("pad", "<|endoftext|>"), ("unk", "<|endoftext|>"))}
        try:
            return cls(vocab, merges, source=str(folder), **kw)
        except Exception as e:  # tokenizers raises plain Exceptions on malformed merges
            raise CheckpointError(f"{folder}: unusable CLIP tokenizer files ({e})") from None

    def __call__(self, texts: list[str], max_length: int = 77):
        ids_list, masks = [], []
        for text in texts:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids[: max_length - 2]
            ids = [self.bos_token_id] + ids + [self.eos_token_id]
            pad = max_length - len(ids)
            ids_list.append(ids + [self.pad_token_id] * pad)
            masks.append([1] * len(ids) + [0] * pad)
        return torch.tensor(ids_list, dtype=torch.long), torch.tensor(masks, dtype=torch.long)


def find_clip_tokenizer(weights: Path) -> Path:
    """The file's own tokenizer first (<stem>_tokenizer/, <stem>.tokenizer.json, then tokenizer/ or tokenizer.json /
    vocab.json + merges.txt in its folder); only a snapshot's text_encoder/ falls back to the snapshot's tokenizer/
    (a folder in models/text_encoders/ never borrows models/text_encoders/tokenizer/, another model's)."""
    folder, stem = weights.parent, weights.name.split(".")[0]
    candidates = [folder / f"{stem}_tokenizer", folder / f"{stem}.tokenizer.json", folder / "tokenizer", folder]
    if folder.name == "text_encoder":
        candidates.append(folder.parent / "tokenizer")
    for c in candidates:
        if (c.is_file() and c.suffix == ".json") or (c.is_dir() and ((c / "tokenizer.json").is_file() or
                                                                    (c / "vocab.json").is_file())):
            return c
    return candidates[-1]


def resolve_clip_text(path: Path, tokenizer: Optional[Path] = None, hint: str = ""):
    """(params, state dict, weights file, tokenizer) for a text_encoder/ folder, a snapshot root or a file;
    ``hint``: where the snapshot it belongs to is published (registry.fetch_hint)."""
    from ..loading import load_component
    sd, cfg, weights = load_component(path, "text_encoder", hint)
    try:
        sd = to_native_layout(sd)
    except ValueError as e:
        raise CheckpointError(f"{weights}: {e}. Use the text_encoder/ of the same Würstchen snapshot.") from None
    from .common import require_config
    # Head count, activation and LayerNorm eps are not in the weights (bigG and ViT-H differ from OpenAI's).
    cfg = require_config(cfg, path, weights, "text_encoder", "the attention head count, activation and LayerNorm "
                         "eps", "the text_encoder/config.json of the same snapshot (warp-ai/wuerstchen-prior for "
                         "Stage C, warp-ai/wuerstchen for Stage B)")
    try:
        params = CLIPTextParams.from_hf_config(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{weights}: unsupported CLIP text config: {e}") from None
    tok_path = tokenizer or find_clip_tokenizer(weights)
    try:
        tok = CLIPTokenizer.from_path(tok_path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{weights}: no CLIP tokenizer found ({e}); put the snapshot's tokenizer/ folder "
                              "(tokenizer.json or vocab.json + merges.txt) beside it") from None
    return params, sd, weights, tok
