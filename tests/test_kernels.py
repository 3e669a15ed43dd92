"""Triton kernels (kernels) against their eager twins.

CPU: the kernels run in the Triton interpreter inside ONE subprocess (TRITON_INTERPRET must be set before triton is
imported, and other test modules may already have imported it in this process); it prints JSON measurements that
the tests below assert on. Bounds: fp32 <= 1e-5 relative, fp16/bf16 <= 1 ulp of the output dtype (the interpreter
truncates fp32->bf16 stores instead of rounding), bitwise equal across two runs.
GPU (real compile, autotune, torch.compile, CUDA graphs): skipped without CUDA.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from helpers import max_rel_err

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = r'''
import json, os
import torch
import kernels
from kernels import triton_kernels as tk
from waifukit.waifu.dit import LinearDiT, LinearDiTParams

def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

def ulps(a, b):
    # distance in representable steps: map sign-magnitude bits to ordered integers
    def ordered(t):
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs().max().item()

def ulp_excess(out, ref32, dt):
    # |out - exact| in units of the output dtype's ulp at the exact value, after allowing fp32 summation-order
    # noise (1e-6 of the max): <= 1 means "within one ulp".
    mant = 7 if dt == torch.bfloat16 else 10
    e = torch.frexp(ref32.abs().clamp_min(2.0 ** -14))[1] - 1
    ulp = torch.pow(2.0, (e - mant).double())
    err = (out.double() - ref32.double()).abs() - 1e-6 * ref32.abs().max().double()
    return (err.clamp_min(0) / ulp).max().item()

res = {"autotune_bypassed": tk._la_state_run is tk._la_state and tk._la_apply_run is tk._la_apply, "la": [], "cfg": []}
g = torch.Generator().manual_seed(0)
cases = [(2, 200, 3, 32, None), (2, 1000, 4, 32, 3), (2, 1024, 2, 32, 4), (1, 64, 2, 16, None), (2, 37, 2, 64, None)]
for dt in (torch.float32, torch.float16, torch.bfloat16):
    for B, N, H, D, split in cases:
        qkv = (torch.randn(B, N, 3 * H * D, generator=g) * 2).to(dt)
        qkv[0, 5, :H * D] = -1.0                      # a token whose relu(q) is all zero -> 0, not NaN
        q, k, v = qkv.view(B, N, 3, H, D).unbind(2)    # strided views, as LinearSelfAttention passes them
        out = tk.linear_attention_triton(q, k, v, 1e-8, split=split)
        again = tk.linear_attention_triton(q, k, v, 1e-8, split=split)
        ref = kernels.linear_attention_eager(q, k, v, 1e-8)
        r = {"dtype": str(dt), "shape": [B, N, H, D], "split": split, "rel": rel(out, ref),
             "bitwise_repeat": bool(torch.equal(out, again)), "finite": bool(torch.isfinite(out).all()),
             "zero_row": float(out[0, 5].abs().max()), "out_dtype": str(out.dtype),
             "contiguous": out.is_contiguous()}
        if dt != torch.float32:
            ref32 = kernels.linear_attention_eager(q.float(), k.float(), v.float(), 1e-8)
            r["ulps_vs_exact"] = ulp_excess(out, ref32, dt)
            r["ulps_vs_eager_twin"] = ulps(out, ref)     # informational: both round the same fp32 values
        res["la"].append(r)

# eps is a parameter, and the dispatcher (torch.ops.waifu.*) is the path the model takes
q, k, v = (torch.randn(2, 100, 2, 32, generator=g) for _ in range(3))
res["eps"] = max(rel(kernels.linear_attention(q, k, v, e), kernels.linear_attention_eager(q, k, v, e))
                 for e in (1e-15, 1e-8, 1e-2))

# A whole tiny LinearDiT forward on the Triton path vs the eager path (7 heads x 32, N = 48, batch 2)
p = LinearDiTParams(hidden_size=224, depth=2, cross_num_heads=2, caption_channels=64)
torch.manual_seed(1)
model = LinearDiT(p, attention=kernels.linear_attention).eval()
with torch.no_grad():
    for prm in model.parameters():
        prm.normal_(0, 0.05)
    x, t = torch.randn(2, 16, 6, 8, generator=g), torch.tensor([900.0, 100.0])
    ctx = torch.randn(2, 9, 64, generator=g)
    out_triton = model(x, t, ctx)
    os.environ["WAIFU_KERNELS"] = "eager"
    out_eager = model(x, t, ctx)
    os.environ["WAIFU_KERNELS"] = "triton"
res["model_rel"] = rel(out_triton, out_eager)

# Fused CFG + Euler at every sigma index, guided and not, v in fp32/fp16/bf16
sig = torch.linspace(1, 0, 6) ** 2
x = torch.randn(2, 16, 5, 7, generator=g)
for vdt in (torch.float32, torch.float16, torch.bfloat16):
    for guided in (True, False):
        v = torch.randn(4 if guided else 2, 16, 5, 7, generator=g).to(vdt)
        worst = 0.0
        for i in range(5):
            idx = torch.tensor([i])
            a = kernels.cfg_euler(x, v, sig, idx, 4.5, True)
            b = kernels.cfg_euler_eager(x, v, sig, idx, 4.5, True)
            worst = max(worst, rel(a[0], b[0]), rel(a[1], b[1]))
        res["cfg"].append({"vdtype": str(vdt), "guided": guided, "rel": worst})
print("RESULT" + json.dumps(res))
'''


@pytest.fixture(scope="module")
def interp():
    env = dict(os.environ, TRITON_INTERPRET="1", WAIFU_KERNELS="triton", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_interpreter_bypasses_autotune(interp):
    assert interp["autotune_bypassed"]


def test_linear_attention_kernel_matches_eager_twin(interp):
    assert len(interp["la"]) == 15
    for r in interp["la"]:
        print(r)
        assert r["finite"] and r["zero_row"] == 0.0 and r["contiguous"], r
        assert r["out_dtype"] == r["dtype"], r
        if r["dtype"] == "torch.float32":
            assert r["rel"] <= 1e-5, r
        else:
            assert r["ulps_vs_exact"] <= 1.0, r


def test_linear_attention_kernel_is_deterministic(interp):
    assert all(r["bitwise_repeat"] for r in interp["la"])


def test_eps_parameter_and_model_forward_on_triton_path(interp):
    assert interp["eps"] <= 1e-5
    assert interp["model_rel"] <= 1e-5


def test_cfg_euler_kernel_matches_eager_twin(interp):
    assert len(interp["cfg"]) == 6
    for r in interp["cfg"]:
        assert r["rel"] <= 1e-6, r


_TUNE_SCRIPT = r'''
import json, torch
from kernels import triton_kernels as tk
g = torch.Generator().manual_seed(5)
res = []
for dt in (torch.float32, torch.bfloat16):
    qkv = (torch.randn(2, 1000, 3 * 2 * 32, generator=g) * 2).to(dt)
    q, k, v = qkv.view(2, 1000, 3, 2, 32).unbind(2)
    outs = {}
    for bs, ba in [(64, 64)] + [(b, 64) for b in tk.BLOCK_CHOICES[1:]] + [(64, b) for b in tk.BLOCK_CHOICES[1:]]:
        tk._STATE_FIXED["BLOCK_N"], tk._APPLY_FIXED["BLOCK_N"] = bs, ba   # what autotune would pick per process
        outs[f"{bs}/{ba}"] = tk.linear_attention_triton(q, k, v, 1e-8, split=2)
    tk._STATE_FIXED["BLOCK_N"] = tk._APPLY_FIXED["BLOCK_N"] = 64
    base = outs["64/64"]
    other_split = tk.linear_attention_triton(q, k, v, 1e-8, split=1)
    res.append({"dtype": str(dt), "configs": sorted(outs), "differ": [c for c, o in outs.items() if not torch.equal(o, base)],
                "split_changes_bits": int((other_split != base).sum())})
print("RESULT" + json.dumps(res))
'''


def test_linear_attention_result_does_not_follow_the_tuned_block():
    """Autotune picks BLOCK_N by timing, so two processes can run different configs: every BLOCK_N of the tuning
    space (state and apply kernel) gives bitwise the same output (fp32 and bf16, N = 1000 over 2 splits; the
    interpreter runs each config). Control: a real change of reduction order (another split) changes bits, so the
    bitwise comparison can fail."""
    env = dict(os.environ, TRITON_INTERPRET="1", WAIFU_KERNELS="triton", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _TUNE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    for r in res:
        print(r)
        assert len(r["configs"]) == 5 and r["differ"] == [], r
    assert res[0]["split_changes_bits"] > 0  # fp32: the control moves bits


def test_dispatch_modes(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("WAIFU_KERNELS", raising=False)
    assert kernels.kernel_mode() == "auto" and not kernels.use_triton(cpu)
    monkeypatch.setenv("WAIFU_KERNELS", "eager")
    assert not kernels.use_triton(torch.device("cuda"))
    monkeypatch.setenv("WAIFU_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="WAIFU_KERNELS"):
        kernels.kernel_mode()
    monkeypatch.setenv("WAIFU_KERNELS", "auto")
    q, k, v = (torch.randn(1, 10, 2, 32) for _ in range(3))
    assert torch.equal(kernels.linear_attention(q, k, v, 1e-8), kernels.linear_attention_eager(q, k, v, 1e-8))



def test_triton_mode_refuses_what_triton_cannot_run(monkeypatch):
    """Issue 11: WAIFU_KERNELS=triton on CPU tensors without TRITON_INTERPRET said only Triton's "0 active drivers",
    and an unsupported head dim silently ran the eager twin. Both are now refused, saying what to set."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("WAIFU_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*") as e:
        kernels.use_triton(torch.device("cpu"))
    assert "WAIFU_KERNELS" in str(e.value) and "GPU" in str(e.value)
    q, k, v = (torch.randn(1, 10, 2, 24) for _ in range(3))  # head dim 24: no Triton kernel for it
    with pytest.raises(RuntimeError, match="head dims 16, 32, 64, 128; this model has 24. Set WAIFU_KERNELS=auto"):
        kernels.linear_attention(q, k, v, 1e-8)
    # Control: the same call in auto mode runs the eager twin.
    monkeypatch.setenv("WAIFU_KERNELS", "auto")
    assert torch.equal(kernels.linear_attention(q, k, v, 1e-8), kernels.linear_attention_eager(q, k, v, 1e-8))


# ----------------------------------------------------------------------------------------------------------------
# GPU only: the compiled kernels at Waifu's shape, torch.compile, CUDA graphs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _qkv(B, N, H, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, N, 3 * H * D, generator=g, device="cuda", dtype=torch.float32).to(dtype)
    return qkv.view(B, N, 3, H, D).unbind(2)


@cuda
@pytest.mark.parametrize("N", [9216, 16384, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_parity_waifu_shape(N, dtype):
    tk = kernels.load_triton()
    q, k, v = _qkv(2, N, 70, 32, dtype)
    out = tk.linear_attention_triton(q, k, v, 1e-8)
    ref = kernels.linear_attention_eager(q, k, v, 1e-8)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert max_rel_err(out.float(), ref.float()) <= tol
    assert torch.equal(out, tk.linear_attention_triton(q, k, v, 1e-8))  # deterministic


@cuda
def test_gpu_compile_fullgraph_and_cuda_graph():
    kernels.load_triton()
    q, k, v = _qkv(2, 4096, 70, 32, torch.bfloat16)
    fn = torch.compile(lambda a, b, c: kernels.linear_attention(a, b, c, 1e-8) * 2, fullgraph=True)
    eager = kernels.linear_attention(q, k, v, 1e-8) * 2
    assert torch.equal(fn(q, k, v), eager)
    x = torch.randn(2, 16, 96, 96, device="cuda")
    vv = torch.randn(4, 16, 96, 96, device="cuda")
    sig = torch.linspace(1, 0, 5, device="cuda")
    i = torch.zeros(1, dtype=torch.long, device="cuda")
    kernels.cfg_euler(x, vv, sig, i, 4.5, True)                    # warm up / compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        xn, x0 = kernels.cfg_euler(x, vv, sig, i, 4.5, True)
    for step in range(4):
        i.fill_(step)
        graph.replay()
        a, b = kernels.cfg_euler_eager(x, vv, sig, i, 4.5, True)
        assert max_rel_err(xn, a) <= 1e-6 and max_rel_err(x0, b) <= 1e-6


def test_imports_this_repositorys_kernels():
    """`kernels` is a common name (Hugging Face publishes a package called kernels): the tests must be exercising
    the repository's own kernels/ package, and the pack imports it relatively (never by the bare name)."""
    import kernels.fused
    assert Path(kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert Path(kernels.fused.__file__).resolve() == ROOT / "kernels" / "fused.py"
    bare = [f"{f.relative_to(ROOT)}:{n}" for f in [*(ROOT / "nodes").rglob("*.py"), *(ROOT / "waifukit").rglob("*.py"),
                                                  *(ROOT / "kernels").rglob("*.py")]
            for n, line in enumerate(f.read_text().splitlines(), 1)
            if line.strip().startswith(("import kernels", "from kernels"))]
    assert not bare, bare
    # One way: kernels/ imports no model or node code (the DiT receives kernels.linear_attention).
    upward = [f"{f.name}:{n}" for f in (ROOT / "kernels").glob("*.py")
              for n, line in enumerate(f.read_text().splitlines(), 1)
              if line.strip().startswith(("from ..", "import waifukit", "from waifukit", "from nodes", "import nodes"))]
    assert not upward, upward


def test_kernels_are_inference_only_and_the_model_differentiates_on_its_own():
    """The fast ops refuse a gradient in words; a LinearDiT built with them still differentiates (through its own
    plain formula) and gives the same output as the fast op without gradients."""
    from waifukit.waifu.dit import LinearDiT, LinearDiTParams
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 50, 3 * 64, generator=g, requires_grad=True)
    q, k, v = qkv.view(2, 50, 3, 2, 32).unbind(2)
    for op in (kernels.linear_attention, kernels.linear_attention_eager):
        with pytest.raises(RuntimeError, match="inference-only"):
            op(q, k, v, 1e-8)
    torch.manual_seed(0)
    p = LinearDiTParams(hidden_size=64, depth=1, cross_num_heads=1, caption_channels=8)
    model = LinearDiT(p, attention=kernels.linear_attention)
    for prm in model.parameters():
        torch.nn.init.normal_(prm, 0, 0.05)
    x, t, ctx = torch.randn(1, 16, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 3, 8, generator=g)
    out = model(x, t, ctx)
    out.square().sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    with torch.no_grad():
        fast = model(x, t, ctx)
        assert max_rel_err(fast, out.detach()) <= 1e-5
        assert max_rel_err(model(x, t * 0.5, ctx), fast) > 1e-3      # control: another timestep moves it


def test_auto_mode_falls_back_to_eager_when_triton_fails(monkeypatch, caplog):
    """A kernel that fails on some GPU/Triton version must not fail every prompt: auto mode warns once and
    stays on the eager twins; WAIFU_KERNELS=triton still raises."""
    import kernels as K

    def boom(*args):
        raise RuntimeError("PTX compile failed")

    monkeypatch.setattr(K, "_triton_failed", None)
    monkeypatch.setattr(K, "load_triton", lambda: object())
    monkeypatch.setattr(K, "_triton_linear_attention", boom)
    monkeypatch.setenv("WAIFU_KERNELS", "auto")
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    real_use_triton = K.use_triton
    # Pretend these CPU tensors are on a GPU for the dispatcher.
    monkeypatch.setattr(K, "use_triton", lambda device: real_use_triton(torch.device("cuda")))
    assert K.use_triton(q.device)
    out = K.linear_attention(q, k, v, 1e-8)
    assert torch.equal(out, K.linear_attention_eager(q, k, v, 1e-8))
    assert K._triton_failed is not None and "Triton kernel failed" in caplog.text
    assert not real_use_triton(torch.device("cuda"))
    monkeypatch.setattr(K, "_triton_failed", None)
    monkeypatch.setenv("WAIFU_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="PTX"):
        K.linear_attention(q, k, v, 1e-8)
