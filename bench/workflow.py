"""Benchmark: the time a user waits, queue to PNG, for each family's example workflow through a real ComfyUI server,
against the diffusers/transformers reference pipeline on the same files, in one run, interleaved (ours, reference,
ours, ...), min and median.

Files: the reduced-width snapshots the tests use (tests/fixtures/*_snapshot.py: the published layouts, tiny widths,
random weights), so the figures are ratios, not a forecast of full-size times. Ours: the example workflow
(example_workflows/<family>_t2i.api.json) at its default steps, sampler and CFG, POSTed to /prompt; a new prompt text
each run so the text encode runs every time (loaders stay cached, as for a user's second image); per stage from the
server's "executing" websocket events. Reference: the published pipeline written out step by step in
tests/fixtures (diffusers + transformers only), models loaded once; Waifu per stage (encode / sample / decode),
SDXS and Würstchen end to end (diffusers' own pipelines for Würstchen).

    .venv/bin/python bench/workflow.py                     # Waifu, 256², 3 repeats: a few minutes on 2 cores
    .venv/bin/python bench/workflow.py --families waifu sdxs wuerstchen --size 512 --reps 5
The ComfyUI is the test suite's primary host ($COMFYUI_PATH, else .cache/ComfyUI).
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from common import Report, load_note, parser, write_results  # noqa: E402

STAGES = {"MexmaSigLIPEncode": "encode", "WuerstchenTextEncode": "encode", "LinearDiTSampler": "sample",
          "SDXSSampler": "sample", "WuerstchenStageC": "sample", "WuerstchenStageB": "sample",
          "AuraVAE16Decode": "decode", "WuerstchenStageA": "decode", "SaveImage": "save"}


def _api(family: str, size: int | None) -> dict:
    wf = json.loads((ROOT / "example_workflows" / f"{family}_t2i.api.json").read_text())
    for node in wf.values():
        node.pop("_meta", None)
        if size and "width" in node["inputs"]:
            node["inputs"]["width"] = node["inputs"]["height"] = size
    return wf


def _texts(wf: dict) -> list[str]:
    return [k for k, v in wf.items() if v["class_type"] in ("MexmaSigLIPEncode", "WuerstchenTextEncode")
            and v["inputs"]["text"]]


def run_ours(host, wf: dict, i: int) -> tuple[float, dict]:
    """Queue-to-PNG seconds and seconds per stage, from the websocket 'executing' events of this prompt."""
    import websocket
    wf = copy.deepcopy(wf)
    for k in _texts(wf):
        wf[k]["inputs"]["text"] += f", take {i}"     # a new prompt: the encoders run again, the loaders stay cached
    client = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{host.port}/ws?clientId={client}", timeout=600)
    events, done = [], threading.Event()

    def listen():
        while not done.is_set():
            msg = ws.recv()
            if isinstance(msg, str):
                m = json.loads(msg)
                if m["type"] == "executing":
                    events.append((time.perf_counter(), m["data"].get("node")))
                    if m["data"].get("node") is None:
                        done.set()
                elif m["type"] == "execution_error":
                    done.set()

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    t0 = time.perf_counter()
    code, body = host.queue(wf, client_id=client)
    if code != 200:
        raise RuntimeError(f"/prompt answered {code}: {body}")
    entry = host.wait(body["prompt_id"])
    total = time.perf_counter() - t0
    done.wait(10)
    ws.close()
    if events and events[-1][1] is None:
        total = events[-1][0] - t0      # the server's "done" event, not the /history poll (0.2 s granularity)
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(f"{entry['status']}\n{host.log_tail()}")
    stages = {}
    for (ta, node), (tb, _) in zip(events, events[1:]):
        if node is not None:
            stage = STAGES.get(wf[node]["class_type"], "other")
            stages[stage] = stages.get(stage, 0.0) + tb - ta
    return total, stages


# ----------------------------------------------------------------------------------------------- references
# Each returns a callable run(i) -> (seconds, {stage: seconds}); the pipelines are the fixtures' (no waifukit).

def waifu_reference(models: Path, wf: dict):
    from fixtures.waifu_snapshot import load_reference, reference_encode
    ref = load_reference(models / "diffusers" / "waifu-2b")
    s = wf["4"]["inputs"]
    prompt, negative = wf["2"]["inputs"]["text"], wf["3"]["inputs"]["text"]

    @torch.no_grad()
    def run(i):
        # WaifuPipeline written out (as tests/fixtures/waifu_snapshot.reference_images), timed per stage.
        t0 = time.perf_counter()
        cond, cond_mask = reference_encode(ref, [prompt + f", take {i}"])
        uncond, uncond_mask = reference_encode(ref, [negative])
        t1 = time.perf_counter()
        sched = ref["scheduler"]
        sched.set_timesteps(s["steps"])
        latents = torch.randn([1, 16, s["height"] // 8, s["width"] // 8],
                              generator=torch.Generator("cpu").manual_seed(s["seed"]))
        context, mask = torch.cat([uncond, cond]), torch.cat([uncond_mask, cond_mask])
        for t in sched.timesteps:
            v = ref["transformer"](torch.cat([latents] * 2), encoder_hidden_states=context,
                                   encoder_attention_mask=mask, timestep=t.expand(2)).sample.float()
            v_u, v_c = v.chunk(2)
            latents = sched.step(v_u + s["cfg"] * (v_c - v_u), t, latents).prev_sample
        t2 = time.perf_counter()
        vae = ref["vae"]
        image = vae.decode(latents / vae.config.scaling_factor).sample
        _png(image)
        t3 = time.perf_counter()
        return t3 - t0, {"encode": t1 - t0, "sample": t2 - t1, "decode": t3 - t2}
    return run


def sdxs_reference(models: Path, wf: dict):
    from fixtures.sdxs_snapshot import load_reference, reference_images
    ref = load_reference(models / "diffusers" / "sdxs")
    s = wf["4"]["inputs"]

    def run(i):
        t0 = time.perf_counter()
        img = reference_images(ref, wf["2"]["inputs"]["text"] + f", take {i}", wf["3"]["inputs"]["text"], s["seed"],
                               s["steps"], s["cfg"], s["width"], s["height"], 1, s["sampler"])
        _png(img)
        return time.perf_counter() - t0, {}
    return run


def wuerstchen_reference(models: Path, wf: dict):
    from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS
    from fixtures.wuerstchen_snapshot import load_reference, reference_images
    ref = load_reference(models / "diffusers" / "wuerstchen-prior", models / "diffusers" / "wuerstchen")
    c, b = wf["5"]["inputs"], wf["7"]["inputs"]

    def run(i):
        t0 = time.perf_counter()
        img, _ = reference_images(ref, wf["3"]["inputs"]["text"] + f", take {i}", wf["4"]["inputs"]["text"],
                                  c["width"], c["height"], 1, c["seed"], DEFAULT_STAGE_C_TIMESTEPS, c["cfg"],
                                  b["seed"], b["steps"], b["cfg"])
        _png(img)
        return time.perf_counter() - t0, {}
    return run


def _png(image):
    """What SaveImage does with the result: uint8 and a PNG, so both sides end at the same point."""
    import io

    import numpy as np
    from PIL import Image
    if torch.is_tensor(image):
        image = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    Image.fromarray(np.asarray(image)[0]).save(io.BytesIO(), format="PNG", compress_level=4)


def install(family: str, models: Path):
    if family == "waifu":
        from fixtures.waifu_snapshot import build_waifu_snapshot
        build_waifu_snapshot(models / "diffusers" / "waifu-2b")
    elif family == "sdxs":
        from fixtures.sdxs_snapshot import install_sdxs
        install_sdxs(models)
    else:
        from fixtures.wuerstchen_snapshot import install_wuerstchen
        install_wuerstchen(models)


REFERENCES = {"waifu": waifu_reference, "sdxs": sdxs_reference, "wuerstchen": wuerstchen_reference}


def main(args):
    from comfy_host import ComfyHost
    from setup_comfyui import primary_host
    report = Report()  # prints each line and keeps it for the results file, header first
    emit = report.emit
    emit(f"reduced-width test snapshots (tests/fixtures), fp32 CPU; queue-to-PNG through ComfyUI ({primary_host().name}) "
         f"vs the reference pipeline, {args.reps} interleaved repeats, min and median (s); "
         f"{'size ' + str(args.size) + '²' if args.size else 'the example sizes'}, example steps")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for family in args.families:
            install(family, base / "models")
        host = ComfyHost(base).start()
        try:
            for family in args.families:
                wf = _api(family, args.size)
                ref_run = REFERENCES[family](base / "models", wf)
                run_ours(host, wf, -1)                   # loads the models once, as a user's first image does
                ref_run(-1)
                ours, ref = [], []
                for i in range(args.reps):
                    ours.append(run_ours(host, wf, i))
                    ref.append(ref_run(i))
                o = [t for t, _ in ours]
                r = [t for t, _ in ref]
                emit("")
                emit(f"{family}: ours {min(o):.2f} s (median {statistics.median(o):.2f}), reference {min(r):.2f} s "
                     f"(median {statistics.median(r):.2f}); ours/reference {min(o) / min(r):.2f}x (min), "
                     f"{statistics.median(o) / statistics.median(r):.2f}x (median)")
                for stage in ("encode", "sample", "decode", "save", "other"):
                    os_ = [st.get(stage) for _, st in ours if st.get(stage) is not None]
                    rs_ = [st.get(stage) for _, st in ref if st.get(stage) is not None]
                    if not os_ and not rs_:
                        continue
                    line = f"  {stage:>7}: ours {min(os_):.3f} s" if os_ else f"  {stage:>7}: ours -"
                    if rs_:
                        line += f", reference {min(rs_):.3f} s"
                        if os_:
                            line += f", {min(os_) / min(rs_):.2f}x"
                    emit(line + " (min)")
        finally:
            host.stop()
    emit(load_note())
    write_results("workflow", report.lines, args.out)


def cli(argv=None):
    p = parser("workflow", __doc__)
    p.add_argument("--families", nargs="+", choices=sorted(REFERENCES), default=["waifu"],
                   help="example workflows to time (default: waifu)")
    p.add_argument("--size", type=int, default=256, help="image side in px for every family (0: the example's own; "
                                                          "Würstchen needs a multiple of 128)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repeats")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(cli())
