# Self-bootstrapping: `make test` / `make demo` build .venv on first use (idempotent, fast on re-run).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp

.PHONY: test test-fast demo venv comfyui chromium clean

venv: $(STAMP)

$(STAMP): requirements/torch.txt requirements/test.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements/torch.txt
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements/test.txt -c requirements/torch.txt
	touch $(STAMP)

comfyui: $(STAMP)
	$(VPY) scripts/setup_comfyui.py

# Debian's chromium for the browser test (Playwright drives it; no browser download). Needs root/apt.
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The whole suite: pure-torch parity tests, the real ComfyUI server tests and the browser test.
test: comfyui chromium
	$(VPY) -m pytest -q -p no:cacheprovider tests

# Parity tests only (no ComfyUI server).
test-fast: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider tests -m "not host"

demo: comfyui
	$(VPY) scripts/demo.py

clean:
	rm -rf .cache demo-output test-artifacts
