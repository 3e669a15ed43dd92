"""XLM-R tokenizer for the MEXMA-SigLIP text tower, on the ``tokenizers`` library (no transformers).

Provenance: reproduces what ``transformers`` (5.x) ``AutoTokenizer.from_pretrained(folder)`` does with
an XLM-R ``tokenizer.json`` (``XLMRobertaTokenizer``, transformers/models/xlm_roberta/
tokenization_xlm_roberta.py) called with ``padding="max_length", truncation=True``.

transformers 5 does not run tokenizer.json's pipeline as written: it keeps the Unigram vocabulary and
only a sentencepiece ``Precompiled`` normalizer, then pre-tokenizes with WhitespaceSplit + Metaspace
and post-processes with ``<s> $A </s>``. For the real XLM-R file (Precompiled + collapse-spaces
normalizer, Metaspace) the two only differ on whitespace (transformers 5 drops trailing spaces and
splits on tabs/newlines, like the original sentencepiece model); ``pipeline="file"`` keeps the file's
own pipeline (what transformers 4's fast tokenizer did).
"""
import base64
import json
import os

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors

TOKENIZER_FILE = "tokenizer.json"
_FIX_HINT = (
    "place the tokenizer/ folder of AiArtLab/waifu-2b (or the tokenizer.json of "
    "visheratin/mexma-siglip) beside the text encoder, or pass the folder/file explicitly"
)


def _find_precompiled(normalizer_json):
    """The sentencepiece Precompiled charsmap normalizer inside tokenizer.json's normalizer, if any."""
    if not normalizer_json:
        return None
    if normalizer_json.get("type") == "Sequence":
        for sub in normalizer_json.get("normalizers", []):
            found = _find_precompiled(sub)
            if found is not None:
                return found
        return None
    return normalizer_json if normalizer_json.get("type") == "Precompiled" else None


class XLMRTokenizer:
    """``tok(texts, max_length=512) -> (input_ids, attention_mask)``, both LongTensor [B, max_length],
    padded on the right with the pad id (1 for XLM-R) and truncated to max_length including
    ``<s>``/``</s>``. No lower-casing here."""

    def __init__(self, tokenizer: Tokenizer, pad_token: str = "<pad>", pipeline: str = "transformers",
                 add_prefix_space: bool = True, source: str = "<memory>"):
        if pipeline not in ("transformers", "file"):
            raise ValueError(f"pipeline must be 'transformers' or 'file', got {pipeline!r}")
        self.source = source
        self.tokenizer = tokenizer
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"{source}: pad token {pad_token!r} is not in the vocabulary")
        self.pad_token, self.pad_token_id = pad_token, pad_id
        self.bos_token_id = tokenizer.token_to_id("<s>")
        self.eos_token_id = tokenizer.token_to_id("</s>")
        if pipeline == "transformers":
            self._rebuild_like_transformers(add_prefix_space)
        # Padding is done by hand in __call__; truncation is set per call.
        tokenizer.no_padding()

    def _rebuild_like_transformers(self, add_prefix_space: bool):
        tok = self.tokenizer
        spec = json.loads(tok.to_str())
        precompiled = _find_precompiled(spec.get("normalizer"))
        # transformers 5 keeps only the Precompiled charsmap (drops NFKC/Replace/... normalizers).
        tok.normalizer = normalizers.Precompiled(
            base64.b64decode(precompiled["precompiled_charsmap"])) if precompiled else None
        scheme = "always" if add_prefix_space else "never"
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme),
        ])
        if self.bos_token_id is None or self.eos_token_id is None:
            raise ValueError(f"{self.source}: <s>/</s> are not in the vocabulary; not an XLM-R tokenizer")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", self.bos_token_id), ("</s>", self.eos_token_id)],
        )

    @classmethod
    def from_path(cls, path, pipeline: str = "transformers") -> "XLMRTokenizer":
        """``path``: a folder holding ``tokenizer.json`` (optionally in a ``tokenizer/`` subfolder, with
        an optional ``tokenizer_config.json`` beside it) or the ``tokenizer.json`` file itself."""
        path = os.fspath(path)
        if os.path.isdir(path):
            candidates = [os.path.join(path, TOKENIZER_FILE), os.path.join(path, "tokenizer", TOKENIZER_FILE)]
        else:
            candidates = [path]
        file = next((c for c in candidates if os.path.isfile(c)), None)
        if file is None:
            raise FileNotFoundError(
                f"XLM-R tokenizer not found: looked for {' and '.join(repr(c) for c in candidates)}; "
                f"expected files: {TOKENIZER_FILE} (+ optional tokenizer_config.json). To fix: {_FIX_HINT}."
            )
        try:
            tokenizer = Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ValueError(f"{file!r} is not a valid tokenizers {TOKENIZER_FILE}: {e}") from e

        config = {}
        config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.isfile(config_file):
            try:
                with open(config_file, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"{config_file!r} is not valid JSON: {e}") from e
            if not isinstance(config, dict):
                raise ValueError(f"{config_file!r} holds a JSON {type(config).__name__}, not an object; replace it with "
                                 f"the published file. To fix: {_FIX_HINT}.")
        return cls(tokenizer, pad_token=_pad_token(tokenizer, config), pipeline=pipeline,
                   add_prefix_space=bool(config.get("add_prefix_space", True)), source=file)

    def __call__(self, texts, max_length: int = 512, pad_to_longest: bool = False):
        """``pad_to_longest``: the tensors end at the longest encoding in the batch instead of at max_length
        (the same ids and mask, minus all-padding columns: XLM-R costs ~linear-to-quadratic in the length)."""
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ValueError(f"max_length must leave room for <s> and </s>, got {max_length}")
        # Truncation is applied to the text part so that <s> ... </s> fits in max_length.
        self.tokenizer.enable_truncation(max_length=max_length)
        encodings = self.tokenizer.encode_batch(list(texts))
        width = max([len(e.ids) for e in encodings] + [1]) if pad_to_longest else max_length
        ids = torch.full((len(encodings), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encodings), width), dtype=torch.long)
        for i, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[i, :n] = torch.tensor(enc.ids, dtype=torch.long)
            mask[i, :n] = 1
        return ids, mask


def _pad_token(tokenizer: Tokenizer, config: dict) -> str:
    """The pad token as transformers would pick it: tokenizer.json's padding, then
    tokenizer_config.json's ``pad_token``, else ``<pad>``."""
    if tokenizer.padding and tokenizer.padding.get("pad_token"):
        return tokenizer.padding["pad_token"]
    pad = config.get("pad_token")
    if isinstance(pad, dict):  # serialized AddedToken
        pad = pad.get("content")
    return pad if isinstance(pad, str) and pad else "<pad>"
