"""How a prompt reaches MEXMA-SigLIP's tokenizer, per model (issue 10, defect 1).

Waifu's published pipeline (AiArtLab/waifu-2b pipeline_waifu.py) lower-cases and strips the prompt; the
AiArtLab/sdxs card's code passes it as typed. ``auto`` prepares each part of the conditioning for the model
that reads it (per-token states: Waifu; pooled vector: SDXS). Exact string equality, and a control that the
two formats really give different token ids with the XLM-R-structured test tokenizer (case-sensitive).
"""
import pytest

from waifukit.mexma.model import PROMPT_FORMATS, prompt_texts

PROMPT = "  A Girl with an Umbrella in the RAIN, Anime Style  "


def test_auto_prepares_each_part_for_its_model():
    assert prompt_texts(PROMPT, "auto") == (PROMPT.lower().strip(), PROMPT)
    assert prompt_texts(PROMPT, "lowercase+strip") == (PROMPT.lower().strip(),) * 2
    assert prompt_texts(PROMPT, "as typed") == (PROMPT, PROMPT)
    assert prompt_texts("一个女孩在雨中撑着伞", "auto") == ("一个女孩在雨中撑着伞",) * 2  # no case: unchanged
    assert set(PROMPT_FORMATS) == {"auto", "lowercase+strip", "as typed"}


def test_unknown_format_is_refused_by_name():
    with pytest.raises(ValueError, match="prompt_format"):
        prompt_texts(PROMPT, "lower")


def test_the_formats_tokenize_differently(tmp_path):
    """Control: the case and the surrounding spaces reach different token ids, so the format matters."""
    from tokenizers import Tokenizer

    from fixtures.tiny_tokenizer import build_xlmr_tokenizer
    build_xlmr_tokenizer(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    waifu, sdxs = prompt_texts(PROMPT, "auto")
    assert tok.encode(waifu).ids != tok.encode(sdxs).ids
