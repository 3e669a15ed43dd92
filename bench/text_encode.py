"""Benchmark: MEXMA-SigLIP text encoding (XLM-R-large + the 1024->1152 projector) at 512 padded positions, as the
encoder ran before, against the prompt-length encoding nodes/mexma_host.py now runs (the ids end at the longest
real token), for prompts of a few token counts.

Full-size XLM-R-large (24 layers, hidden 1024, 16 heads) with random weights; fp32 on CPU (what
``text_encoder_device: cpu`` runs), bf16 on CUDA. Token ids are synthetic (``<s>``, random ids, ``</s>``, pads):
the cost does not depend on which ids they are. Also printed: the per-token states of the real tokens and the pooled
vector (SDXS's conditioning) of both paths, max rel err.

    .venv/bin/python bench/text_encode.py                  # writes bench/results/text_encode-<device>.txt
    .venv/bin/python bench/text_encode.py --tokens 24 --reps 2 --out -   # quick look
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common import Report, load_note, min_median, parser, time_interleaved, write_results  # noqa: E402
from waifukit.mexma.model import MexmaSigLIPText  # noqa: E402
from waifukit.mexma.xlmr import XLMRobertaParams  # noqa: E402


def ids_for(n: int, total: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((1, total), 1, dtype=torch.long)
    mask = torch.zeros((1, total), dtype=torch.long)
    ids[0, 0], ids[0, n - 1] = 0, 2
    ids[0, 1:n - 1] = torch.randint(5, vocab, (n - 2,), generator=g)
    mask[0, :n] = 1
    return ids, mask


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def main(args):
    report = Report()  # prints each line and keeps it for the results file, header first
    emit = report.emit
    cuda = torch.cuda.is_available()
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    params = XLMRobertaParams() if not args.reduced else XLMRobertaParams(num_layers=4)
    torch.manual_seed(0)
    model = MexmaSigLIPText(params, projector_dim=1152, dtype=dtype, device=dev).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    emit(f"XLM-R {'large' if not args.reduced else 'large REDUCED to 4 layers'} ({params.num_layers} layers, hidden "
         f"{params.hidden_size}) + projector 1024->1152, random init, {dtype}, {dev.type}; "
         f"min and median of {args.reps} interleaved repeats")
    emit(f"{'real tokens':>11} | {'512 padded s':>13} {'(median)':>9} | {'prompt-length s':>15} {'(median)':>9} | "
         f"{'speed-up (min)':>14} | {'states rel err':>14} {'pooled rel err':>14}")

    with torch.inference_mode():
        for n in args.tokens:
            ids, mask = ids_for(n, 512, params.vocab_size, seed=n)
            ids, mask = ids.to(dev), mask.to(dev)
            fns = {"padded": lambda: model(ids, mask), "short": lambda: model(ids[:, :n], mask[:, :n])}
            outs = {k: f() for k, f in fns.items()}          # warm-up and the outputs compared below
            ts = min_median(time_interleaved(fns, args.reps, warm=0,
                                             sync=torch.cuda.synchronize if cuda else None))   # (min, median) s
            (hp, pp), (hs, ps) = outs["padded"], outs["short"]
            emit(f"{n:>11} | {ts['padded'][0]:>13.3f} {ts['padded'][1]:>9.3f} | "
                 f"{ts['short'][0]:>15.3f} {ts['short'][1]:>9.3f} | "
                 f"{ts['padded'][0] / ts['short'][0]:>13.1f}x | {rel(hs, hp[:, :n]):>14.1e} {rel(ps, pp):>14.1e}")
    emit("a workflow encodes the prompt and the negative (\"\" = 2 tokens): both shrink")
    emit(load_note())
    write_results("text_encode", report.lines, args.out)


def cli(argv=None):
    p = parser("text_encode", __doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[2, 24, 64, 77],
                   help="real token counts incl. <s> and </s> (default 2 24 64 77)")
    p.add_argument("--reps", type=int, default=3, help="interleaved timing repeats")
    p.add_argument("--reduced", action="store_true", help="4 layers instead of 24 (a quick look on a busy machine)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(cli())
