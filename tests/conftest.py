import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The pure-torch core is importable on its own (no ComfyUI): put the repo root on the path.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
# `kernels` is also the name of a Hugging Face package: fail early, in words, if the tests would exercise that one.
import kernels  # noqa: E402

if Path(kernels.__file__).resolve().parent != ROOT / "kernels":
    raise RuntimeError(f"tests import `kernels` from {kernels.__file__}, not this repository's {ROOT / 'kernels'}; "
                       "run pytest from the repository (its root leads sys.path)")

_HOSTS = None


def hosts():
    """The ComfyUI hosts every real-host test runs on (scripts/setup_comfyui.py), resolved once."""
    global _HOSTS
    if _HOSTS is None:
        from setup_comfyui import test_hosts
        _HOSTS = test_hosts()
    return _HOSTS


def pytest_generate_tests(metafunc):
    # Every test that needs a ComfyUI (``comfy_host``, directly or through a module's `host` fixture) runs
    # once per host; the host's name is in the test id, e.g. test_api_workflow_matches_reference[comfyui-0.33.0-...].
    if "comfy_host" in metafunc.fixturenames:
        found, _ = hosts()
        metafunc.parametrize("comfy_host", found, ids=[h.name for h in found], scope="session", indirect=True)


@pytest.fixture(scope="session")
def comfy_host(request):
    """The setup_comfyui.Host this test runs on."""
    return request.param


def pytest_terminal_summary(terminalreporter):
    if _HOSTS is None:  # no real-host test was collected
        return
    found, skipped = hosts()
    counts = {h.name: Counter() for h in found}
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            for name in counts:
                if f"[{name}" in rep.nodeid or f"-{name}]" in rep.nodeid or f"-{name}-" in rep.nodeid:
                    counts[name][outcome] += 1
    terminalreporter.section("ComfyUI hosts")
    for h in found:
        c = counts[h.name]
        terminalreporter.write_line(f"{h.name} ({h.path}): {c['passed']} passed, {c['failed']} failed, "
                                    f"{c['error']} errors, {c['skipped']} skipped")
    for line in skipped:
        terminalreporter.write_line(line)
