"""The weights CLI: ``python -m waifukit weights list|fetch|verify [model] --comfyui PATH``.

Run it from the pack folder (``cd ComfyUI/custom_nodes/comfyui-waifu``). Everything is driven by
``weights_manifest.json``::

    {"models": {"<id>": {"hf_repo", "revision", "family", "comfy_folder", "download",
                          "files": [{"path", "approx_bytes", "size", "sha256", ...}]}}}

``comfy_folder`` is relative to ``ComfyUI/models/``; a file goes to ``models/<comfy_folder>/<path>``.
Optional fields: per file ``"dest"`` (relative to ``ComfyUI/models/``, replaces ``<comfy_folder>/<path>``) and
``"url"`` (a full URL used instead of the Hugging Face resolve URL; the HF token is never sent to it).

The nodes and loaders never download anything; this module is the only place that touches the network, and
only when ``fetch`` is asked to. Standard library only (no torch import), so the CLI starts instantly.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import importlib.util
import json
import os
import shutil
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

PACK_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MANIFEST = PACK_ROOT / "weights_manifest.json"
DEFAULT_ENDPOINT = "https://huggingface.co"
# Formats that unpickle on load (arbitrary code): refused unless the user opts in.
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl", ".pickle")
CHUNK = 1 << 20
USAGE_NOTE = ("Run from the pack folder: cd ComfyUI/custom_nodes/comfyui-waifu && "
              "python -m waifukit weights fetch waifu-2b --comfyui /path/to/ComfyUI")


class WeightsError(Exception):
    """A problem the user can act on; the message says what and how."""


# ----------------------------------------------------------------------------------------------- manifest

def load_manifest(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read the weights manifest ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise WeightsError(f"{path}: not a weights manifest (no \"models\" object)")
    for mid, model in data["models"].items():
        for key in ("hf_repo", "comfy_folder", "files"):
            if key not in model:
                raise WeightsError(f"{path}: model {mid!r} has no {key!r}")
        for f in model["files"]:
            # The manifest decides where bytes land: never outside ComfyUI/models/.
            for key in ("path", "dest"):
                if key in f:
                    _safe_rel(f[key], f"{path}: model {mid!r} file {f.get('path')!r} {key}")
        _safe_rel(model["comfy_folder"], f"{path}: model {mid!r} comfy_folder")
    return data


def _safe_rel(rel: str, what: str) -> None:
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise WeightsError(f"{what}: {rel!r} must be a relative path inside ComfyUI/models/ without '..'")


def dump_manifest(data: dict) -> str:
    """JSON in the hand-written layout (one line per file entry), so ``--record`` diffs stay readable."""
    def enc(obj, depth: int) -> str:
        pad = "  " * depth
        if isinstance(obj, dict) and obj:
            items = [f"{pad}  {json.dumps(k, ensure_ascii=False)}: {enc(v, depth + 1)}" for k, v in obj.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
            items = [f"{pad}  {json.dumps(x, ensure_ascii=False)}" for x in obj]
            return "[\n" + ",\n".join(items) + "\n" + pad + "]"
        return json.dumps(obj, ensure_ascii=False)
    return enc(data, 0) + "\n"


def write_manifest(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_manifest(data), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written manifest


def default_comfyui() -> Path:
    """$COMFYUI_PATH, else the ComfyUI this pack is installed in (custom_nodes/<pack>), else ./ComfyUI."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env)
    if PACK_ROOT.parent.name == "custom_nodes":
        return PACK_ROOT.parent.parent
    return Path("ComfyUI")


def dest_path(comfyui: Path, model: dict, f: dict) -> Path:
    models = Path(comfyui) / "models"
    return models / f["dest"] if f.get("dest") else models / model["comfy_folder"] / f["path"]


def file_url(endpoint: str, model: dict, f: dict) -> str:
    if f.get("url"):
        return f["url"]
    rev = model.get("revision") or "main"
    # Same quoting as huggingface_hub: a revision like refs/pr/1 is one path segment.
    return (f"{endpoint.rstrip('/')}/{urllib.parse.quote(model['hf_repo'], safe='/')}/resolve/"
            f"{urllib.parse.quote(rev, safe='')}/{urllib.parse.quote(f['path'], safe='/')}")


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def human(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def is_pickle(f: dict) -> bool:
    return Path(f["path"]).suffix.lower() in PICKLE_SUFFIXES or Path(f.get("dest") or "").suffix.lower() in PICKLE_SUFFIXES


# ----------------------------------------------------------------------------------------------- checking

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def format_problem(path: Path, suffix: Optional[str] = None) -> Optional[str]:
    """Cheap structural check, useful while sizes/hashes are not pinned: a truncated safetensors file or an
    HTML error page saved as JSON is caught even without a manifest sha256."""
    suffix = (suffix or path.suffix).lower()  # a .part file is checked as what it will become
    size = path.stat().st_size
    if suffix == ".safetensors":
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "not a safetensors file (shorter than its 8-byte header length)"
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000 or 8 + n > size:
                return "not a safetensors file, or truncated (bad header length)"
            try:
                header = json.loads(fh.read(n))
            except ValueError:
                return "not a safetensors file (header is not JSON)"
        if not isinstance(header, dict):
            return "not a safetensors file (header is not a JSON object)"
        try:
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (TypeError, KeyError, IndexError):
            return "not a safetensors file (malformed tensor entries)"
        if 8 + n + end != size:
            return f"truncated or padded safetensors file: the header says {8 + n + end} bytes, the file has {size}"
    elif suffix == ".json" and size < 200_000_000:
        try:
            json.loads(path.read_bytes())
        except ValueError:
            return "not valid JSON (an error page or a truncated download?)"
    return None


def check_file(path: Path, f: dict, hashing: str = "pinned") -> tuple[Optional[str], dict]:
    """(problem or None, measured facts) for a file that should match manifest entry ``f``.
    ``hashing``: "never" (fast, for list), "pinned" (when the manifest has a sha256) or "always"."""
    if not path.is_file():
        return "missing", {}
    size = path.stat().st_size
    facts = {"size": size}
    if f.get("size") is not None and size != f["size"]:
        return f"wrong size: {size} bytes, expected {f['size']}", facts
    problem = format_problem(path, Path(f.get("dest") or f["path"]).suffix)
    if problem:
        return problem, facts
    if hashing == "always" or (hashing == "pinned" and f.get("sha256")):
        digest = sha256_file(path)
        facts["sha256"] = digest
        if f.get("sha256") and digest.lower() != f["sha256"].lower():
            return f"sha256 mismatch: got {digest}, expected {f['sha256']}", facts
    return None, facts


# ----------------------------------------------------------------------------------------------- download

class _DropAuthOnRedirect(urllib.request.HTTPRedirectHandler):
    """HF redirects LFS files to a CDN with a signed URL: never forward the token to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_DropAuthOnRedirect)


class _Retry(Exception):
    pass


def _back_off(reason: str, backoff: float, stalls: int, log) -> None:
    """Say why an attempt failed and wait before the next one: ``backoff`` seconds, doubling with each attempt in
    a row that brought no bytes, at most 30 s."""
    wait = min(backoff * (2 ** max(stalls - 1, 0)), 30.0)
    log(f"    interrupted ({reason}); retrying{f' in {wait:.0f}s' if wait >= 1 else ''}")
    time.sleep(wait)


def _content_range(value: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """'bytes 10-99/100' -> (10, 100); 'bytes */100' -> (None, 100)."""
    try:
        spec = value.split(" ", 1)[1]
        rng, total = spec.split("/", 1)
        start = None if rng == "*" else int(rng.split("-", 1)[0])
        return start, (None if total == "*" else int(total))
    except (AttributeError, ValueError):
        return None, None


def http_download(url: str, part: Path, expected_size: Optional[int], *, token: Optional[str] = None,
                  timeout: float = 60.0, retries: int = 10, backoff: float = 2.0, log=print) -> None:
    """Download ``url`` into ``part``, resuming from what ``part`` already holds (HTTP Range), with at most
    ``retries`` retries; the .part survives failures so the next run resumes."""
    part.parent.mkdir(parents=True, exist_ok=True)
    stalls = attempts = 0
    while True:
        attempts += 1
        have = part.stat().st_size if part.exists() else 0
        if expected_size is not None and have > expected_size:
            log(f"    {part.name}: {have} bytes is more than the expected {expected_size}; starting over")
            part.unlink()
            have = 0
        if expected_size is not None and have == expected_size:
            return
        headers = {"User-Agent": "comfyui-waifu-weights/1", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        got = 0
        try:
            try:
                resp = _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout)
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:
                    _, total = _content_range(e.headers.get("Content-Range"))
                    e.close()
                    if total == have and expected_size is None:
                        return  # the .part was already complete
                    log(f"    {part.name}: server refused to resume; starting over")
                    part.unlink()
                    raise _Retry() from None
                e.close()
                if e.code in (401, 403):
                    raise WeightsError(f"{url}: HTTP {e.code}: the repository is gated or private. Accept its "
                                       "license on huggingface.co and set HF_TOKEN, then run fetch again.") from None
                if e.code == 404:
                    raise WeightsError(f"{url}: HTTP 404: not found (wrong revision or file name in the "
                                       "manifest?)") from None
                if e.code == 429 or e.code >= 500:
                    raise _Retry(f"HTTP {e.code}") from None
                raise WeightsError(f"{url}: HTTP {e.code} {e.reason}") from None
            with resp:
                if resp.status == 206:
                    start, total = _content_range(resp.headers.get("Content-Range"))
                    if start != have:  # a confused server: do not glue mismatched bytes, start over
                        part.unlink()
                        raise _Retry(f"server resumed at byte {start}, asked for {have}")
                    mode = "ab"
                else:
                    if have:
                        log(f"    {part.name}: server ignored the Range request; downloading from the start")
                    have, mode = 0, "wb"
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                if expected_size is not None and total is not None and total != expected_size:
                    raise WeightsError(f"{url}: the server has {total} bytes but the manifest says {expected_size}: "
                                       "the manifest is out of date or the file changed upstream; nothing was placed.")
                if have:
                    log(f"    resuming at {human(have)}")
                with open(part, mode) as out:
                    while True:
                        block = resp.read(CHUNK)
                        if not block:
                            break
                        out.write(block)
                        got += len(block)
                target = total if total is not None else expected_size
                if target is not None and have + got != target:
                    raise _Retry(f"connection ended at {have + got} of {target} bytes")
                return
        except (_Retry, OSError, http.client.HTTPException) as e:
            # OSError covers URLError, timeouts and resets; HTTPException covers IncompleteRead (a dropped body).
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        stalls = 0 if got else stalls + 1
        if attempts > retries:
            raise WeightsError(f"{url}: download failed after {attempts} attempts ({reason}). The partial file "
                               f"{part} is kept: run fetch again to resume.")
        _back_off(reason, backoff, stalls, log)  # longer waits only while no bytes arrive


def have_hf_hub() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def hf_xet_in_use() -> bool:
    """Whether huggingface_hub hands Xet-stored files to hf_xet (installed, not disabled by HF_HUB_DISABLE_XET):
    those transfers run with hf_xet's own timeouts and retries, which --timeout does not reach."""
    from huggingface_hub import constants
    disabled = getattr(constants, "HF_HUB_DISABLE_XET", None)
    if disabled is None:  # a huggingface_hub from before Xet storage
        return False
    return not disabled and importlib.util.find_spec("hf_xet") is not None


@contextlib.contextmanager
def _hf_timeout(timeout: float):
    """huggingface_hub's download (read) timeout set to ``timeout`` for the calls inside, restored after.
    huggingface_hub reads ``constants.HF_HUB_DOWNLOAD_TIMEOUT`` at call time (``http_get``); its metadata request
    takes ``etag_timeout``, which ``$HF_HUB_ETAG_TIMEOUT`` overrides unless ``constants.HF_HUB_ETAG_TIMEOUT``
    is set as well, so both are."""
    from huggingface_hub import constants
    saved = constants.HF_HUB_DOWNLOAD_TIMEOUT, constants.HF_HUB_ETAG_TIMEOUT
    constants.HF_HUB_DOWNLOAD_TIMEOUT = constants.HF_HUB_ETAG_TIMEOUT = timeout
    try:
        yield
    finally:
        constants.HF_HUB_DOWNLOAD_TIMEOUT, constants.HF_HUB_ETAG_TIMEOUT = saved


def _causes(e: BaseException):
    """``e`` and what it was raised from (huggingface_hub wraps a failed metadata request in
    LocalEntryNotFoundError)."""
    seen = []
    while e is not None and e not in seen and len(seen) < 8:
        seen.append(e)
        e = e.__cause__
    return seen


def _hf_retryable(e: Exception) -> bool:
    """False for what fails the same way next time: an HTTP 4xx other than 408/429 (gated, private, wrong
    revision or file name), offline mode, a bad argument; looked for in ``e`` and what it was raised from."""
    for c in _causes(e):
        status = getattr(getattr(c, "response", None), "status_code", None)
        if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
            return False
        if any(k.__name__ == "OfflineModeIsEnabled" for k in type(c).__mro__):
            return False
    return isinstance(e, OSError) or not isinstance(e, ValueError)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def hf_hub_fetch(model: dict, f: dict, staging: Path, endpoint: Optional[str], *, timeout: float = 60.0,
                 retries: int = 10, backoff: float = 2.0, log=print) -> Path:
    """``hf_hub_download`` into ``staging`` with at most ``retries`` retries, waiting as ``http_download`` does,
    and ``timeout`` as its read and metadata timeout (see ``_hf_timeout``; not hf_xet's). huggingface_hub resumes a
    dropped connection within one call; whether a failed call's partial file is reused depends on its version
    (2.x discards it), so each failed attempt counts as one that brought no bytes."""
    from huggingface_hub import hf_hub_download
    attempts = 0
    while True:
        attempts += 1
        try:
            with _hf_timeout(timeout):
                return Path(hf_hub_download(model["hf_repo"], f["path"], revision=model.get("revision") or None,
                                            local_dir=str(staging), endpoint=endpoint, etag_timeout=timeout))
        except Exception as e:  # its errors are many classes; all mean the same thing to the user
            if not _hf_retryable(e) or attempts > retries:
                tried = f" after {attempts} attempts" if attempts > 1 else ""
                cause = "".join(f" (from {_first_line(c)})" for c in _causes(e)[1:2])
                raise WeightsError(f"{model['hf_repo']}/{f['path']}: huggingface_hub download failed{tried}: "
                                   f"{e}{cause}. Run fetch again, or use --no-hf-hub for the built-in downloader "
                                   "(it resumes from a .part file).") from None
            reason = _first_line(e)
        _back_off(reason, backoff, attempts, log)


# ----------------------------------------------------------------------------------------------- commands

def _select(manifest: dict, model_ids) -> dict:
    models = manifest["models"]
    if not model_ids:
        return models
    unknown = [m for m in model_ids if m not in models]
    if unknown:
        raise WeightsError(f"unknown model {', '.join(unknown)}; the manifest has: {', '.join(models)}")
    return {m: models[m] for m in model_ids}


def cmd_list(args, manifest: dict, out) -> int:
    comfy = Path(args.comfyui)
    out(f"ComfyUI: {comfy.resolve()}{'' if comfy.is_dir() else '  (not found)'}")
    for mid, model in _select(manifest, args.model).items():
        files = model["files"]
        known = sum(f["size"] if f.get("size") is not None else f.get("approx_bytes") or 0 for f in files)
        done = 0
        out(f"\n{mid}  ({model['hf_repo']}@{model.get('revision') or 'main'}, family {model.get('family', '?')})")
        out(f"  -> {(comfy / 'models' / model['comfy_folder']).resolve()}")
        for f in files:
            dest = dest_path(comfy, model, f)
            problem, _ = check_file(dest, f, hashing="never")
            if problem is None:
                status = "ok" if f.get("size") is not None else "present"
                done += 1
            elif problem == "missing" and part_path(dest).is_file():
                status = f"partial ({human(part_path(dest).stat().st_size)} in .part)"
            else:
                status = "missing" if problem == "missing" else f"BAD: {problem}"
            size = f"{f['size']} B" if f.get("size") is not None else f"~{human(f.get('approx_bytes'))}"
            where = f"  -> models/{f['dest']}" if f.get("dest") else ""
            tags = (" [pickle]" if is_pickle(f) else "") + (" [sha256]" if f.get("sha256") else "")
            out(f"  {status:<10} {size:>12}  {f['path']}{where}{tags}")
        out(f"  {done}/{len(files)} present, total ~{human(known)}")
    out("\n'ok' = exact size matches the manifest; 'present' = size not pinned yet; hashes are checked by "
        "'verify'. Fetch from the pack folder (ComfyUI/custom_nodes/comfyui-waifu): python -m waifukit weights "
        f"fetch {' '.join(_select(manifest, args.model))} --comfyui {comfy}")
    return 0


def cmd_fetch(args, manifest: dict, out) -> int:
    comfy = Path(args.comfyui)
    if not comfy.is_dir():
        raise WeightsError(f"{comfy}: no such ComfyUI folder. Pass --comfyui /path/to/ComfyUI (or set COMFYUI_PATH).")
    endpoint = args.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    use_hub = not args.no_hf_hub and have_hf_hub()
    xet = use_hub and hf_xet_in_use()
    token = os.environ.get("HF_TOKEN") or None
    failures = 0
    for mid, model in _select(manifest, args.model).items():
        pickles = [f["path"] for f in model["files"] if is_pickle(f)]
        if pickles and not args.allow_pickle:
            out(f"{mid}: refusing pickle-format weights {', '.join(pickles)}: loading such files can run arbitrary "
                "code. Use a .safetensors release, or pass --allow-pickle if you trust the source (the loaders "
                "read .pth/.ckpt with torch.load(weights_only=True)).")
            failures += 1
            continue
        note = ("; --timeout does not reach hf_xet transfers (Xet-stored files): set HF_HUB_DISABLE_XET=1 or use "
                "--no-hf-hub" if xet else "")
        out(f"{mid}: {model['hf_repo']}@{model.get('revision') or 'main'} -> {comfy / 'models' / model['comfy_folder']}"
            f" ({'huggingface_hub' if use_hub else 'built-in HTTPS'} via {endpoint}{note})")
        staging = comfy / "models" / ".waifu-download" / mid
        for f in model["files"]:
            dest = dest_path(comfy, model, f)
            problem, _ = check_file(dest, f)
            if problem is None:
                out(f"  skip   {f['path']} (already complete)")
                continue
            if problem != "missing":
                out(f"  redo   {f['path']}: {problem} (the old file stays until a verified one replaces it)")
            out(f"  get    {f['path']} ({f['size'] if f.get('size') is not None else '~' + human(f.get('approx_bytes'))}"
                f"{' B' if f.get('size') is not None else ''})")
            try:
                if use_hub and not f.get("url"):
                    staged = hf_hub_fetch(model, f, staging, args.endpoint or os.environ.get("HF_ENDPOINT"),
                                          timeout=args.timeout, retries=args.retries, backoff=args.backoff, log=out)
                else:
                    staged = part_path(dest)
                    http_download(file_url(endpoint, model, f), staged, f.get("size"),
                                  token=None if f.get("url") else token, timeout=args.timeout,
                                  retries=args.retries, backoff=args.backoff, log=out)
                problem, _ = check_file(staged, f)
                if problem:
                    staged.unlink(missing_ok=True)  # never keep (or place) bytes that failed verification
                    raise WeightsError(f"{f['path']}: downloaded file failed verification: {problem}. It was "
                                       f"deleted and nothing was placed at {dest}. If this repeats, the manifest "
                                       "is out of date or the source changed.")
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, dest)  # atomic: dest is either the old file or the verified new one
                out(f"  ok     {dest}")
            except WeightsError as e:
                out(f"  FAILED {e}")
                failures += 1
        if staging.is_dir() and not any(p.is_file() and ".cache" not in p.parts for p in staging.rglob("*")):
            shutil.rmtree(staging, ignore_errors=True)  # only hf_hub bookkeeping left
            try:
                staging.parent.rmdir()  # models/.waifu-download, when no other model is mid-download
            except OSError:
                pass
    if failures:
        out(f"{failures} problem(s); rerun the same command to retry (the built-in downloader resumes its .part "
            "files).")
        return 1
    return 0


def cmd_verify(args, manifest: dict, out) -> int:
    comfy = Path(args.comfyui)
    problems = recorded = 0
    for mid, model in _select(manifest, args.model).items():
        out(f"{mid} -> {comfy / 'models' / model['comfy_folder']}")
        for f in model["files"]:
            dest = dest_path(comfy, model, f)
            need = args.record and (f.get("size") is None or not f.get("sha256"))
            problem, facts = check_file(dest, f, hashing="always" if need else "pinned")
            if problem:
                problems += 1
                extra = (f"; a partial download ({human(part_path(dest).stat().st_size)}) is there: run fetch "
                         "to resume") if problem == "missing" and part_path(dest).is_file() else ""
                out(f"  FAIL   {f['path']}: {problem}{extra}")
                continue
            pinned = [k for k in ("size", "sha256") if f.get(k)]
            note = "checked " + " + ".join(pinned) if pinned else "present, nothing pinned"
            if need:
                for key in ("size", "sha256"):
                    if f.get(key) is None or f.get(key) == "":
                        f[key] = facts[key]
                        recorded += 1
                note += ", recorded size + sha256"
            out(f"  ok     {f['path']} ({facts['size']} B; {note})")
    if args.record and recorded:
        write_manifest(args.manifest, manifest)
        out(f"recorded {recorded} value(s) into {args.manifest}")
    if problems:
        out(f"{problems} problem(s). Fix with: python -m waifukit weights fetch MODEL --comfyui {comfy}")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m waifukit weights",
                                description="List, download and verify the weights this pack uses. " + USAGE_NOTE)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--comfyui", default=None,
                        help="ComfyUI folder (default: $COMFYUI_PATH, else the ComfyUI this pack sits in, else ./ComfyUI)")
        sp.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="weights manifest (default: the pack's)")

    sp = sub.add_parser("list", help="every model, its files and sizes, and what is present")
    sp.add_argument("model", nargs="*")
    common(sp)
    sp = sub.add_parser("fetch", help="download a model's files into ComfyUI/models/ (resumable, verified)")
    sp.add_argument("model", nargs="+")
    common(sp)
    sp.add_argument("--endpoint", default=None, help=f"Hugging Face endpoint (default: $HF_ENDPOINT or {DEFAULT_ENDPOINT})")
    sp.add_argument("--no-hf-hub", action="store_true", help="use the built-in HTTPS downloader even if huggingface_hub is installed")
    sp.add_argument("--allow-pickle", action="store_true", help="allow .pth/.ckpt/.bin/.pt weight files")
    sp.add_argument("--retries", type=int, default=10,
                    help="retries per file within one run, with either downloader (default 10); huggingface_hub "
                         "also makes a few quick retries of its own inside each attempt")
    sp.add_argument("--timeout", type=float, default=60.0,
                    help="seconds without data before an attempt fails and is retried (default 60); with "
                         "huggingface_hub, its HTTP read and metadata timeout, but not hf_xet's (Xet-stored files "
                         "when hf_xet is installed: set HF_HUB_DISABLE_XET=1 or use --no-hf-hub)")
    sp.add_argument("--backoff", type=float, default=2.0, help=argparse.SUPPRESS)
    sp = sub.add_parser("verify", help="check presence, size and sha256; exit 1 on any problem")
    sp.add_argument("model", nargs="*")
    common(sp)
    sp.add_argument("--record", action="store_true",
                    help="write measured size/sha256 into the manifest where they are null (for maintainers)")
    return p


def main(argv=None, out=None) -> int:
    out = out or (lambda s: print(s, flush=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    # Accept both `python -m waifukit weights fetch ...` and `... fetch ...` from callers that drop the word.
    if argv and argv[0] == "weights":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args.comfyui is None:
        args.comfyui = str(default_comfyui())
    try:
        manifest = load_manifest(args.manifest)
        return {"list": cmd_list, "fetch": cmd_fetch, "verify": cmd_verify}[args.command](args, manifest, out)
    except WeightsError as e:
        out(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        out("interrupted; partial downloads are kept as .part files and resume on the next fetch")
        return 130
