"""Issue 11: hostile inputs, long queues, several workers and faults, tried as an API client would on a real
ComfyUI server with every family's tiny models (one server per host; a second one for the workers case).

- Bad values (every input of every node of ours, walked from /object_info, no hand-kept list): refused at
  POST /prompt with an error naming the input, never an exception inside validation. Huge sizes and batches are
  refused before anything is allocated (peak RSS unchanged).
- Bad files (tests/reliability_files.py: every loader node x zero bytes, random bytes, truncated, header length
  2**40, data offsets out of range, wrong shapes, wrong family, config missing/non-JSON/non-object, tokenizer
  missing, code-running pickles): each ends as a clean refusal naming the file and the fix (and the model the
  loader is for), the pickles' marker file never appears, and a good prompt runs after each.
- Bad files, the queue, interrupts and two workers run on the first host only (the heavy part; the CI budget is
  ~3 minutes on 2 cores across both hosts); bad values and the network guard run on both. 55 prompts queued at
  once (sizes, batches, seeds, hostile prompt texts) with none lost and RSS growth bounded; an /interrupt in
  every sampler of ours with the queue behind it completing; two servers sharing models/ and user/ give
  identical images for identical seeds and leave a valid preview cache.
- No network at load: a sitecustomize in the server records every non-loopback connect/DNS lookup with its
  stack; none may come from the pack.

``pytest -s`` prints the closing-note table (cases tried, clean refusals, items lost, RSS growth, interrupts).
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from comfy_host import ComfyHost, error_message  # noqa: E402

import reliability_files  # noqa: E402
from fixtures.catalog import install_all  # noqa: E402

pytestmark = pytest.mark.host

FAMILY_WF = {f: json.loads((ROOT / "example_workflows" / f"{f}_t2i.api.json").read_text())
             for f in ("waifu", "sdxs", "wuerstchen")}
SAMPLER_NODE = {"waifu": "4", "sdxs": "4", "wuerstchen": "5"}
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN")
FIX_WORDS = ("download", "use ", "replace", "put ", "pick", "set ", "get the weights", "install", "connect",
             "must be", "needs", "encode")
RAW_SIGNS = ("Traceback", "\x1b[", "weights_only` set to `False", "weights_only=False", "object has no attribute",
             "not all arguments converted")
TABLE: dict = {}  # the closing note's figures, printed at the end of the module

NET_GUARD = '''
import ipaddress, json, os, sys, traceback
_LOG = os.environ.get("WAIFU_NET_LOG")

def _local(host):
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False

def _hook(event, args):
    if event == "socket.connect":
        addr = args[1]
        host = addr[0] if isinstance(addr, tuple) else None  # AF_UNIX paths are local
    elif event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
    else:
        return
    if _local(host):
        return
    with open(_LOG, "a") as f:
        f.write(json.dumps({"event": event, "host": str(host), "stack": "".join(traceback.format_stack(limit=30))}) + "\\n")

if _LOG:
    sys.addaudithook(_hook)
    with open(_LOG, "a") as f:  # proves the guard is armed in this process
        f.write(json.dumps({"event": "armed", "pid": os.getpid(), "host": "", "stack": ""}) + "\\n")
'''


def wf(family: str, seed: int = 1, **sampler) -> dict:
    """A quick prompt of ``family``: tiny sizes, one step per stage."""
    w = copy.deepcopy(FAMILY_WF[family])
    node = SAMPLER_NODE[family]
    if family == "wuerstchen":
        w["5"]["inputs"].update(steps=1, schedule="linear", width=128, height=128, seed=seed)
        w["7"]["inputs"].update(steps=1, seed=seed)
    else:
        w[node]["inputs"].update(steps=1, width=64, height=64, seed=seed)
    w[node]["inputs"].update(sampler)
    return w


def set_text(w: dict, family: str, text: str) -> dict:
    for nid in ("2",) if family != "wuerstchen" else ("3", "6"):
        w[nid]["inputs"]["text"] = text
    return w


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (the CI cost; wall time on a shared machine says little)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def images(host, entry) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in host.output_images(entry)]


def wait_all(host, ids, timeout=600.0) -> dict:
    out = {}
    for pid in ids:
        out[pid] = host.wait(pid, timeout)
    return out


def queue_all(host, prompts) -> list[tuple[int, dict]]:
    return [host.queue(p) for p in prompts]


def names_context(text: str, *needles: str) -> bool:
    return any(n and n in text for n in needles)


def is_clean(message: str, *needles: str) -> bool:
    """A message a user can act on: it names the input or file, says what to do, and is not raw Python text."""
    low = message.lower()
    return (names_context(message, *needles) and any(w in low for w in FIX_WORDS)
            and not any(s in message for s in RAW_SIGNS))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Good tiny models of every family plus every bad file, built once and shared by all hosts."""
    root = tmp_path_factory.mktemp("reliability")
    models = root / "models"
    install_all(models)
    marker = root / "PICKLE-CODE-RAN"
    cases, good = reliability_files.build(models, str(marker))
    guard = root / "netguard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NET_GUARD)
    return {"root": root, "models": models, "marker": marker, "cases": cases, "good": good, "guard": guard}


def start(base: Path, comfy_host, models, netlog: Path, user: Path | None = None) -> ComfyHost:
    base.mkdir(parents=True, exist_ok=True)
    (base / "models").symlink_to(models["models"], target_is_directory=True)
    if user is not None:
        (base / "user").symlink_to(user, target_is_directory=True)
    env = {"PYTHONPATH": str(models["guard"]), "WAIFU_NET_LOG": str(netlog)}
    # --cache-lru keeps the good models loaded between the bad-file prompts (the classic cache drops every node
    # the current prompt does not use).
    return ComfyHost(base, comfy_host, extra_args=["--cache-lru", "64"], env=env).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory, comfy_host, models):
    base = tmp_path_factory.mktemp(f"rel-{comfy_host.name}")
    netlog = base.parent / f"net-{comfy_host.name}.jsonl"
    h = start(base / "a", comfy_host, models, netlog, user=None)
    h.netlog = netlog
    h.stats = TABLE.setdefault(comfy_host.name, {})
    h.first = comfy_host.name == _first_host()
    yield h
    h.stop()


def _first_host() -> str:
    from conftest import hosts
    return hosts()[0][0].name


def heavy_only_on_first(server):
    if not server.first:
        pytest.skip("queue, interrupts and workers run on the first host only (CI time budget; see the docstring)")


# ---------------------------------------------------------------------------------------------------- bad values

def bad_values(typ, opts: dict) -> list[tuple[str, object]]:
    if typ == "FLOAT":
        out = [("NaN", float("nan")), ("+inf", float("inf")), ("-inf", float("-inf")), ("text", "four point five"),
               ("list", [1.0])]
    elif typ == "INT":
        out = [("text", "sixty-four"), ("float NaN", float("nan"))]
        out += [(f"huge {v:.0e}", v) for v in (10 ** 12, 10 ** 30) if v > opts.get("max", math.inf)]
    elif isinstance(typ, list):
        return [("traversal", "../../../../etc/passwd"), ("absolute", "/etc/passwd"), ("dotdot", ".."),
                ("windows traversal", "..\\..\\secrets.safetensors"), ("not listed", "no-such-model.safetensors")]
    else:
        return []
    if "min" in opts and opts["min"] > -1e300:
        out.append(("below min", opts["min"] - 1))
    if "max" in opts and opts["max"] < 1e300:
        out.append(("above max", opts["max"] + (1 if typ == "INT" else 1.0)))
    return out


def base_graphs(good) -> list[dict]:
    """API prompts that together contain every node of ours (each family's example, the file loaders, the
    empty latent and the image prompt)."""
    graphs = [wf(f) for f in FAMILY_WF]
    loaders = {}
    for loader, (kind, inp, _, _) in reliability_files.SINGLE.items():
        loaders[loader] = {"1": {"class_type": loader, "inputs": {inp: good[loader], "dtype": "auto"}},
                           "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    graphs += list(loaders.values())
    w = wf("waifu")
    w["10"] = {"class_type": "WaifuEmptyLatent", "inputs": {"bucket": "512x512 (1:1)", "batch_size": 1}}
    w["4"]["inputs"]["latent_image"] = ["10", 0]
    graphs.append(w)
    s = wf("sdxs")
    s["11"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}
    s["12"] = {"class_type": "MexmaSigLIPImagePrompt",
               "inputs": {"conditioning": ["2", 0], "text_encoder": ["1", 1], "image": ["11", 0], "weight": 0.5}}
    s["4"]["inputs"]["positive"] = ["12", 0]
    s["2"]["inputs"]["image_weight"] = 0.5
    graphs.append(s)
    lora = json.loads((ROOT / "example_workflows" / "waifu_lora.api.json").read_text())
    lora["4"]["inputs"].update(steps=1, width=64, height=64)
    graphs.append(lora)
    # SDXSLoraLoader, validated only: the catalog has no SDXS LoRA, so it runs with the Waifu one (refused there).
    s = wf("sdxs")
    s["13"] = {"class_type": "SDXSLoraLoader",
               "inputs": {"model": ["1", 0], "lora_name": lora["7"]["inputs"]["lora_name"], "strength": 0.5}}
    s["4"]["inputs"]["model"] = ["13", 0]
    s["validate_only"] = True
    graphs.append(s)
    return graphs


def other_output(graph: dict, info: dict, want) -> list | None:
    """A link to some output in ``graph`` whose type is not ``want`` (the wrong-type link case)."""
    for nid, node in graph.items():
        for i, t in enumerate(info[node["class_type"]]["output"]):
            if t != want and t != "*":
                return [nid, i]
    return None


def node_errors_text(body: dict, nid: str) -> str:
    errs = body.get("node_errors", {}).get(nid, {}).get("errors", [])
    return json.dumps(errs, ensure_ascii=False)


def test_bad_values_of_every_input_are_refused_naming_it(server, models):
    info = server.get("/object_info")
    ours = {k for k, v in info.items() if v.get("python_module", "").endswith("comfyui-waifu")}
    assert len(ours) >= 20, ours
    graphs = base_graphs(models["good"])
    validate_only = {i for i, g in enumerate(graphs) if g.pop("validate_only", False)}
    placed = {}
    for g in graphs:
        for nid, node in g.items():
            placed.setdefault(node["class_type"], (g, nid))
    assert ours <= set(placed), f"no base graph holds {sorted(ours - set(placed))}"
    # Controls: every base graph is accepted as it is (and runs).
    controls = []
    for g in graphs:
        code, body = server.queue(g)
        assert code == 200, json.dumps(body)[:1500]
        controls.append(body["prompt_id"])
    for entry in wait_all(server, [c for i, c in enumerate(controls) if i not in validate_only], 300).values():
        # The image prompt needs the full MEXMA-SigLIP (vision tower); the tiny SDXS snapshot has the text part.
        assert entry["status"]["status_str"] == "success" or "missing vision tower" in error_message(entry), \
            error_message(entry)
    hwm_before = rss_kb(server.proc.pid, "VmHWM")
    tried = refused = 0
    failures = []
    for cls in sorted(ours):
        g, nid = placed[cls]
        spec = info[cls]["input"]
        for section in ("required", "optional"):
            for name, (typ, *rest) in spec.get(section, {}).items():
                opts = rest[0] if rest else {}
                cases = [(label, v, "value") for label, v in bad_values(typ, opts)]
                if not isinstance(typ, list) and typ not in WIDGETS:  # a link
                    cases.append(("wrong link type", other_output(g, info, typ), "value"))
                    if section == "required":
                        cases.append(("missing link", None, "delete"))
                elif section == "required":
                    cases.append(("missing value", None, "delete"))
                for label, value, how in cases:
                    if how == "value" and value is None:
                        continue
                    bad = copy.deepcopy(g)
                    if how == "delete":
                        bad[nid]["inputs"].pop(name, None)
                    else:
                        bad[nid]["inputs"][name] = value
                    tried += 1
                    code, body = server.queue(bad)
                    text = node_errors_text(body, nid)
                    ok = (code == 400 and name in text and "exception_during" not in text
                          and "not all arguments converted" not in text)
                    if ok:
                        refused += 1
                    else:
                        failures.append(f"{cls}.{name} {label}: HTTP {code} {json.dumps(body)[:400]}")
                        if code == 200:
                            server.post("/queue", {"clear": True})
    hwm_after = rss_kb(server.proc.pid, "VmHWM")
    server.stats.update(values_tried=tried, values_refused=refused, hwm_growth_mb=(hwm_after - hwm_before) / 1024)
    print(f"\nbad values: {tried} tried, {refused} refused naming the input; peak RSS "
          f"{hwm_before / 1024:.0f} -> {hwm_after / 1024:.0f} MB")
    assert not failures, "\n".join(failures[:40])
    assert tried >= 40
    # Huge sizes and batches (10**12, 10**30 above) were refused before anything was allocated.
    assert hwm_after - hwm_before < 64 * 1024


def test_nan_cfg_was_the_old_failure(server):
    """Control for the walk above: NaN cfg is refused by our validation, naming cfg, and the same prompt with a
    finite cfg is accepted."""
    w = wf("waifu")
    w["4"]["inputs"]["cfg"] = float("nan")
    code, body = server.queue(w)
    assert code == 400 and "cfg must be a finite number" in node_errors_text(body, "4")
    w["4"]["inputs"]["cfg"] = 4.5
    w["4"]["inputs"]["width"] = "sixty-four"
    code, body = server.queue(w)
    text = node_errors_text(body, "4")
    assert code == 400 and "width must be a whole number" in text and "invalid_input_type" in text
    w["4"]["inputs"]["width"] = 64
    code, body = server.queue(w)
    assert code == 200, body
    server.wait(body["prompt_id"], 300)


# ----------------------------------------------------------------------------------------------------- bad files

DOWNLOAD_CASES = {"zero bytes", "random bytes", "header length 2**40", "data offsets out of range", "zero-byte pickle",
                  "random-byte pickle", "code-running pickle", "truncated", "zero weights"}


def loader_prompt(loader: str, inp: str, value: str) -> dict:
    return {"1": {"class_type": loader, "inputs": {inp: value, "dtype": "auto"}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


def test_bad_files_for_every_loader_are_refused_cleanly(server, models):
    heavy_only_on_first(server)
    info = server.get("/object_info")
    loaders = {k for k, v in info.items() if v.get("python_module", "").endswith("comfyui-waifu") and k.endswith("Loader")}
    # The LoRA loaders (a MODEL in, a LoRA file) arrived while this suite was written: its bad LoRA files are
    # not in reliability_files yet; its values are in the walk above.
    loaders -= {"LinearDiTLoraLoader", "SDXSLoraLoader"}
    table = set(reliability_files.SINGLE) | set(reliability_files.SNAPSHOTS)
    assert loaders == table, f"loader nodes without bad-file cases: {sorted(loaders ^ table)}"
    hints = {**{k: v[2] for k, v in reliability_files.SINGLE.items()},
             **{k: v[2] for k, v in reliability_files.SNAPSHOTS.items()}}
    # Controls: every loader loads its good file.
    for loader in sorted(loaders):
        inp = reliability_files.SINGLE.get(loader, (None, "snapshot"))[1]
        entry = server.run(loader_prompt(loader, inp, models["good"][loader]), 300)
        assert entry["status"]["status_str"] == "success", (loader, error_message(entry))
    ids, meta = [], []
    for i, (loader, inp, value, what) in enumerate(models["cases"]):
        code, body = server.queue(loader_prompt(loader, inp, value))
        assert code == 200, (loader, value, body)
        ids.append(body["prompt_id"])
        meta.append((loader, value, what))
        code, body = server.queue(wf("waifu", seed=1000 + i))  # the good prompt after each bad one
        assert code == 200, body
        ids.append(body["prompt_id"])
        meta.append(None)
    entries = wait_all(server, ids)
    clean, ok_loads, failures, good_runs = 0, [], [], 0
    for pid, m in zip(ids, meta):
        entry = entries[pid]
        if m is None:
            assert entry["status"]["status_str"] == "success", error_message(entry)
            good_runs += 1
            continue
        loader, value, what = m
        if entry["status"]["status_str"] == "success":
            ok_loads.append(f"{loader} {value} ({what})")  # e.g. a config the weights make redundant
            continue
        msg = error_message(entry)
        # A damaged or refused weights file calls for a download: the hint must be the loader's own model's.
        model_named = what not in DOWNLOAD_CASES or f"fetch {hints[loader]} --comfyui" in msg
        if is_clean(msg, value.split(".")[0]) and model_named:
            clean += 1
        else:
            failures.append(f"{loader} {value} ({what}): {msg[:600]}")
    server.stats.update(files_tried=len(models["cases"]), files_refused=clean, files_loaded=len(ok_loads),
                        good_after_each=good_runs)
    print(f"\nbad files: {len(models['cases'])} tried, {clean} clean refusals, {len(ok_loads)} loaded anyway "
          f"({'; '.join(ok_loads)}), {good_runs} good prompts after them all succeeded")
    assert not models["marker"].exists(), "a pickle's code ran"
    assert not failures, "\n".join(failures)
    # Only cases that leave the model fully specified may load.
    assert all("missing" in s or "config" in s for s in ok_loads), ok_loads


def test_no_network_at_load(server, models):
    server.get("/object_info")
    records = [json.loads(line) for line in server.netlog.read_text().splitlines()] if server.netlog.exists() else []
    assert any(r["event"] == "armed" and r["pid"] == server.proc.pid for r in records), "guard not armed"
    records = [r for r in records if r["event"] != "armed"]
    ours = [r for r in records if "comfyui-waifu" in r["stack"] or str(ROOT) in r["stack"]]
    server.stats["network_from_pack"] = len(ours)
    print(f"\nnon-loopback socket use in the server: {len(records)} in all, {len(ours)} from the pack")
    assert not ours, ours[0]["stack"]


def test_network_guard_can_fail(models, tmp_path):
    """Control: the same sitecustomize records a non-loopback connect (192.0.2.1 is TEST-NET, never routed)."""
    import subprocess
    log = tmp_path / "net.jsonl"
    code = "import socket\ntry:\n    socket.create_connection(('192.0.2.1', 9), timeout=0.01)\nexcept OSError:\n    pass\n"
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(models["guard"]),
                                                           WAIFU_NET_LOG=str(log)), timeout=60, check=True)
    assert "192.0.2.1" in log.read_text()


# --------------------------------------------------------------------------------------------------------- queue

TEXTS = {
    "empty": "", "long": "a cat sitting on a windowsill, " * 650, "control": "cat\x00\x01\x07\x1b[31m dog\r\n\t",
    "emoji": "🐱‍👤 🏳️‍🌈 👩🏽‍🚀 cat", "rtl": "قطة جميلة على النافذة שלום עולם",
    "surrogate": "cat \ud800 dog", "surrogate-fffd": "cat \ufffd dog", "cjk": "窗台上的猫 窓辺の猫 창가의 고양이",
    "indic": "खिड़की पर बिल्ली জানালায় বিড়াল ஜன்னலில் பூனை", "other": "кошка γάτα แมว ድመት კატა կատու",
}


def test_long_queue_loses_nothing(server):
    heavy_only_on_first(server)
    for family in FAMILY_WF:  # warm up: models loaded, preview factors fitted
        assert server.run(wf(family, seed=0), 300)["status"]["status_str"] == "success"
    rss0 = rss_kb(server.proc.pid)
    prompts, expect = [], []
    rng = np.random.default_rng(5)
    names = list(TEXTS)
    for i in range(50):
        family = ("waifu", "sdxs", "wuerstchen")[i % 3]
        text = TEXTS[names[i % len(names)]]
        batch = int(rng.integers(1, 3))
        if family == "wuerstchen":
            w = wf(family, seed=int(rng.integers(0, 2**32)), batch_size=batch)
        else:
            w = wf(family, seed=int(rng.integers(0, 2**32)), batch_size=batch,
                   width=int(rng.choice([64, 128])), height=int(rng.choice([64, 128])))
        set_text(w, family, text)
        prompts.append(w)
        expect.append(batch)
    # Prompts that must end as clear errors: a width off the grid (refused at POST) and Stage B guidance without
    # a negative (refused while running).
    bad_size = wf("waifu", width=100)
    no_negative = wf("wuerstchen")
    no_negative["7"]["inputs"]["cfg"] = 2.0
    prompts += [bad_size, no_negative]
    expect += ["refused", "error"]
    # The lone-surrogate decision: replaced with U+FFFD, so both prompts give one image; "cat dog" differs.
    same = []
    for text in ("cat \ud800 dog", "cat \ufffd dog", "cat dog"):
        prompts.append(set_text(wf("waifu", seed=77), "waifu", text))
        expect.append(1)
        same.append(len(prompts) - 1)
    t0 = time.time()
    answers = queue_all(server, prompts)
    ids = [b.get("prompt_id") for c, b in answers]
    entries = wait_all(server, [i for i in ids if i])
    elapsed = time.time() - t0
    rss1 = rss_kb(server.proc.pid)
    history = server.get("/history?max_items=10000")
    lost, counted, clean_errors, got = 0, 0, 0, {}
    for k, ((code, body), want) in enumerate(zip(answers, expect)):
        if want == "refused":
            assert code == 400 and "width must be a multiple of 64" in json.dumps(body)
            clean_errors += 1
            continue
        assert code == 200, body
        pid = body["prompt_id"]
        if pid not in history:
            lost += 1
            continue
        entry = entries[pid]
        if want == "error":
            msg = error_message(entry)
            assert entry["status"]["status_str"] == "error" and is_clean(msg, "negative"), msg
            clean_errors += 1
            continue
        assert entry["status"]["status_str"] == "success", (k, error_message(entry))
        imgs = images(server, entry)
        assert len(imgs) == want, (k, len(imgs), want)
        counted += len(imgs)
        got[k] = imgs
    a, b, c = (got[k][0].astype(int) for k in same)
    growth = (rss1 - rss0) / 1024
    server.stats.update(queue_prompts=len(prompts), queue_images=counted, queue_clean_errors=clean_errors,
                        queue_lost=lost, rss_growth_mb=growth, queue_s=elapsed)
    print(f"\nqueue: {len(prompts)} prompts in {elapsed:.1f} s, {counted} images, {clean_errors} clean errors, "
          f"{lost} lost; server RSS {rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MB ({growth:+.0f} MB); "
          f"surrogate vs U+FFFD max diff {np.abs(a - b).max()}, vs 'cat dog' mean diff {np.abs(a - c).mean():.1f}")
    assert lost == 0
    assert np.array_equal(a, b), "a lone surrogate must encode as U+FFFD"
    assert np.abs(a - c).mean() > 1.0, "control: another prompt must change the image"
    assert growth < 300, f"server RSS grew {growth:.0f} MB over the queue"


# ---------------------------------------------------------------------------------------------------- interrupts

INTERRUPTS = [("waifu", "4", {"steps": 1000, "width": 256, "height": 256}),
              ("sdxs", "4", {"steps": 900, "width": 256, "height": 256}),
              ("wuerstchen", "5", {"steps": 1000, "width": 512, "height": 512}),
              ("wuerstchen", "7", {"steps": 1000})]


def test_interrupt_in_every_sampler_keeps_the_queue(server):
    heavy_only_on_first(server)
    import websocket
    honoured, lines = 0, []
    for family, node, long in INTERRUPTS:
        w = wf(family, seed=3)
        w[node]["inputs"].update(long)
        client = uuid.uuid4().hex
        ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client}", timeout=300)
        try:
            code, body = server.queue(w, client)
            assert code == 200, body
            behind = [server.queue(wf(f, seed=5))[1]["prompt_id"] for f in FAMILY_WF]  # the rest of the queue
            sent_at, last, outcome = None, 0, None
            while outcome is None:
                msg = ws.recv()
                if not isinstance(msg, str):
                    continue
                m = json.loads(msg)
                data = m["data"]
                if data.get("prompt_id") != body["prompt_id"]:
                    continue
                if m["type"] == "progress" and data["node"] == node:
                    last = data["value"]
                    if sent_at is None and last >= 2:
                        server.post("/interrupt", {})
                        sent_at = last
                if m["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    outcome = (m["type"], data)
        finally:
            ws.close()
        kind, data = outcome
        assert kind == "execution_interrupted" and data["node_id"] == node, (kind, data)
        after = last - sent_at
        rest = wait_all(server, behind, 300)
        assert all(e["status"]["status_str"] == "success" for e in rest.values())
        honoured += 1
        lines.append(f"{family}/{node}: interrupt sent at step {sent_at}, last step reported {last} "
                     f"(+{after}), {len(rest)} queued prompts after it completed")
        # The interrupt is checked every step: it lands within the steps that run while the client sees step k
        # and posts /interrupt. A tiny Stage C step takes ~1-2 ms, so on a loaded 2-core box that round trip is a
        # few steps (+4 seen in CI); checked only between nodes, all ~1000 steps would run.
        assert after <= 25, lines[-1]
    server.stats["interrupts"] = f"{honoured}/{len(INTERRUPTS)}"
    print("\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------------------------- workers

def test_two_workers_share_models_and_user(server, models, comfy_host, tmp_path_factory):
    heavy_only_on_first(server)
    shared_user = tmp_path_factory.mktemp("shared-user")
    cache = shared_user / "comfyui-waifu" / "latent_rgb_factors.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{ damaged")  # a half-written cache from an older version: refitted with a warning
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in models["models"].rglob("*") if p.is_file()}
    base = tmp_path_factory.mktemp(f"workers-{comfy_host.name}")
    w1 = start(base / "w1", comfy_host, models, server.netlog, user=shared_user)
    w2 = start(base / "w2", comfy_host, models, server.netlog, user=shared_user)
    try:
        prompts = [wf("waifu", seed=9), wf("sdxs", seed=9), wf("waifu", seed=10, batch_size=2)]
        results = {}

        def run(h, tag):
            results[tag] = [h.run(p, 300) for p in prompts]

        threads = [threading.Thread(target=run, args=(h, t)) for h, t in ((w1, "w1"), (w2, "w2"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        same = 0
        for e1, e2 in zip(results["w1"], results["w2"]):
            assert e1["status"]["status_str"] == "success" and e2["status"]["status_str"] == "success"
            i1, i2 = images(w1, e1), images(w2, e2)
            assert len(i1) == len(i2) and all(np.array_equal(a, b) for a, b in zip(i1, i2))
            same += len(i1)
        data = json.loads(cache.read_text())  # valid JSON after both wrote it
        assert isinstance(data, dict) and data
        assert not list(cache.parent.glob("*.tmp")), "temp files left behind"
        warned = "preview-factor cache" in (w1.log_tail(400) + w2.log_tail(400))
        assert warned, "a damaged cache must be reported"
        after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in models["models"].rglob("*") if p.is_file()}
        assert after == before, "a worker wrote into models/ (it must work read-only)"
        server.stats["workers_identical_images"] = same
        server.stats["workers_cpu_s"] = cpu_s(w1.proc.pid) + cpu_s(w2.proc.pid)
        print(f"\ntwo workers: {same} images identical across workers; preview cache valid, {len(data)} entries")
    finally:
        w1.stop()
        w2.stop()


def test_zz_closing_table(server):
    """Prints the closing note's table for this host (pytest -s)."""
    s = server.stats

    def v(*keys, fmt="{}"):
        return " / ".join(fmt.format(s[k]) for k in keys) if all(k in s for k in keys) else "- (first host only)"

    rows = [("bad values tried / refused naming the input", v("values_tried", "values_refused")),
            ("bad files tried / clean refusals / loaded anyway", v("files_tried", "files_refused", "files_loaded")),
            ("good prompts after each bad file", v("good_after_each")),
            ("queue prompts / images / clean errors / lost", v("queue_prompts", "queue_images", "queue_clean_errors",
                                                               "queue_lost")),
            ("server RSS growth over the queue (MB)", v("rss_growth_mb", fmt="{:+.0f}")),
            ("peak RSS growth over the bad values (MB)", v("hwm_growth_mb", fmt="{:+.0f}")),
            ("interrupts honoured", v("interrupts")),
            ("images identical across two workers", v("workers_identical_images")),
            ("non-loopback sockets opened by the pack", v("network_from_pack")),
            ("server CPU seconds (+ the two workers')", f"{cpu_s(server.proc.pid):.0f}"
             + (f" (+{s['workers_cpu_s']:.0f})" if "workers_cpu_s" in s else ""))]
    print(f"\n| {server.host.name} | |\n| --- | --- |")
    for k, val in rows:
        print(f"| {k} | {val} |")
