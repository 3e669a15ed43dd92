"""Small numeric helpers shared by the parity tests."""
import torch


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|: the parity measure every module test states its bound in."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter with N(0, std) (norm weights around 1) so that zero-initialised
    tables, gates and norms take part in the comparison instead of hiding bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            if p.ndim == 1 and ("norm" in name.lower() or "layernorm" in name.lower()) and name.endswith("weight"):
                noise = noise + 1.0
            p.copy_(noise.to(p.dtype))
    return module
