"""`make demo`: start a real ComfyUI headless, queue the Waifu example through the HTTP API, save the PNG and
print per-stage timings (from the websocket's `executing` events).

Weights: $WAIFU_SNAPSHOT, else $COMFYUI_PATH/models/diffusers/waifu-2b, else a tiny random snapshot is built
(and the image is noise from random weights: the demo says so loudly).
"""
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
from comfy_host import ComfyHost, error_message  # noqa: E402

sys.path.insert(0, str(ROOT))
from waifukit.loading import is_waifu_snapshot  # noqa: E402
from waifukit.registry import FETCH_HINT  # noqa: E402

OUT = ROOT / "demo-output"


def find_real_snapshot():
    for cand in (os.environ.get("WAIFU_SNAPSHOT"),
                 os.environ.get("COMFYUI_PATH") and os.path.join(os.environ["COMFYUI_PATH"], "models/diffusers/waifu-2b")):
        if cand and is_waifu_snapshot(Path(cand)):
            return Path(cand).resolve()
    return None


def main():
    import websocket  # websocket-client, from requirements/test.txt

    OUT.mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="waifu-demo-"))
    target = base / "models" / "diffusers" / "waifu-2b"
    target.parent.mkdir(parents=True)
    real = find_real_snapshot()
    if real:
        target.symlink_to(real, target_is_directory=True)
        print(f"weights: {real}")
    else:
        from fixtures.waifu_snapshot import build_waifu_snapshot
        build_waifu_snapshot(target)
        print("\n" + "!" * 100 + "\n!! NO REAL WEIGHTS FOUND: using a TINY RANDOM snapshot. The image below is noise from random weights.\n"
              f"!! {FETCH_HINT}\n!! then run: COMFYUI_PATH=/path/to/ComfyUI make demo   (or WAIFU_SNAPSHOT=/path/to/waifu-2b make demo)\n"
              + "!" * 100 + "\n")

    prompt = json.loads((ROOT / "example_workflows" / "waifu_t2i.api.json").read_text())
    titles = {k: f'{v["class_type"]} ({v.get("_meta", {}).get("title", "")})' for k, v in prompt.items()}
    host = ComfyHost(base)
    t0 = time.time()
    host.start()
    print(f"ComfyUI up at {host.url} in {time.time() - t0:.1f}s (from {host.comfyui})")
    client = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{host.port}/ws?clientId={client}", timeout=3600)
    try:
        code, body = host.queue(prompt, client)
        if code != 200:
            sys.exit(f"/prompt refused the workflow ({code}): {json.dumps(body, indent=1)[:3000]}")
        pid, events = body["prompt_id"], []
        while True:
            msg = ws.recv()
            if not isinstance(msg, str):
                continue  # binary preview frames
            m = json.loads(msg)
            if m["type"] == "executing" and m["data"].get("prompt_id") == pid:
                events.append((time.time(), m["data"]["node"]))
                if m["data"]["node"] is None:
                    break
            if m["type"] in ("execution_error", "execution_interrupted") and m["data"].get("prompt_id") == pid:
                break
        entry = host.wait(pid)
        if entry["status"]["status_str"] != "success":
            sys.exit(f"the workflow failed: {error_message(entry)}\n{host.log_tail()}")
        print(f"\n{'stage':<60}{'seconds':>10}")
        for (t, node), (t_next, _) in zip(events, events[1:]):
            print(f"{titles.get(node, node):<60}{t_next - t:>10.2f}")
        print(f"{'total (queue to done)':<60}{events[-1][0] - events[0][0]:>10.2f}")
        for path in host.output_images(entry):
            dest = OUT / ("waifu_demo.png" if real else "waifu_demo_RANDOM_WEIGHTS.png")
            shutil.copy(path, dest)
            print(f"\nimage: {dest}")
    finally:
        ws.close()
        host.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
