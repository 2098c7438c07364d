"""Tolerances, poisoned buffers and random-weight helpers shared by the tests.

Tolerance policy: compare against a float64 reference by relative error norm ``||out - ref|| / ||ref||``. The bound
is derived, never tuned to pass:
    tol = 2 * eps(dtype) * sqrt(roundings) + 2 * sqrt(K) * eps(accumulator)
``roundings`` is how many times a result passes through ``dtype`` on its way out (e.g. norm output, activation,
final output), ``K`` the reduction length. eps is torch.finfo's machine epsilon; the factor 2 covers the interpreter's
round-toward-zero casts to bf16 (GPUs round to nearest even). fp32 accumulation is exact-to-rounding on the GPU with
``ieee`` precision (fastvlm's default for fp32).
"""
import math

import torch

POISON = {torch.float32: float("nan"), torch.float16: float("nan"), torch.bfloat16: float("nan")}


def rel_err(out, ref):
    out = out.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    den = ref.norm()
    return float((out - ref).norm() / (den if den > 0 else 1.0))


def tol(dtype, k, roundings=1):
    eps = torch.finfo(dtype).eps
    return 2 * eps * math.sqrt(roundings) + 2 * math.sqrt(k) * torch.finfo(torch.float32).eps


def assert_close(out, ref, dtype, k, roundings=1, what="output"):
    err = rel_err(out, ref)
    bound = tol(dtype, k, roundings)
    assert math.isfinite(err) and err <= bound, f"{what}: relative error {err:.3e} > bound {bound:.3e} ({dtype}, K={k})"


class Guarded:
    """A tensor placed in the middle of a NaN-filled flat buffer; ``check()`` fails if a margin changed."""

    def __init__(self, shape, dtype, device, fill=None, margin=None):
        n = math.prod(shape)
        self.margin = margin or max(4096, n)
        self.buf = torch.full((n + 2 * self.margin,), float("nan"), dtype=dtype, device=device)
        self.tensor = self.buf[self.margin:self.margin + n].view(shape)
        if fill is not None:
            self.tensor.copy_(fill)

    def check(self, name="tensor"):
        lo = self.buf[:self.margin]
        hi = self.buf[self.margin + self.tensor.numel():]
        bad = int((~torch.isnan(lo)).sum()) + int((~torch.isnan(hi)).sum())
        assert bad == 0, f"out-of-bounds store around {name}: {bad} margin element(s) modified"


def guarded_copy(t):
    g = Guarded(tuple(t.shape), t.dtype, t.device, fill=t)
    return g


def randomize_(module, std=0.5, generator=None):
    """Re-randomise every parameter (transformers initialises some to zero or one), in place."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(std).to(p.dtype))
    return module
