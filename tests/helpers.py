"""Tolerances, poisoned buffers and random-weight helpers shared by the tests.

Tolerance policy: compare against a float64 reference by relative error norm ``||out - ref|| / ||ref||``. The bound
is derived, never tuned to pass:
    tol = 2 * eps(dtype) * sqrt(roundings) + 2 * sqrt(K) * eps(accumulator)
``roundings`` is how many times a result passes through ``dtype`` on its way out (e.g. norm output, activation,
final output), ``K`` the reduction length. eps is torch.finfo's machine epsilon; the factor 2 covers the interpreter's
round-toward-zero casts to bf16 (GPUs round to nearest even). fp32 dots are fp32-accurate on the GPU with ``tf32x3``
(fastvlm's default for fp32; docs/design-projector.md measures it) and ``ieee`` (on request).
"""
import math

import pytest

import torch

from fastvlm.testing import rel_err, tolerance as tol  # one definition, shared with `fastvlm check`


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


def require_extension():
    """The CUDA extension's module, built at most once per session. Skips with the reason when it cannot be built
    here (no nvcc, no ninja); a build that starts and fails is a test failure, not a skip."""
    from fastvlm import _cext

    ok, why = _cext.available(build=True)
    if not ok:
        if _cext.failure_kind() in ("build-failed", "stale"):
            pytest.fail(f"the CUDA extension failed to build or load: {why}")
        pytest.skip(f"CUDA extension not available: {why}")
    return _cext.load()


def double(obj):
    """Floating tensors in ``obj`` (nested lists, tuples, dicts) as float64: the inputs of a float64 reference."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(double(o) for o in obj)
    if isinstance(obj, dict):
        return {k: double(v) for k, v in obj.items()}
    return obj


def first_output(out):
    """The first tensor of a module's output (tuples, lists, ``last_hidden_state``)."""
    while isinstance(out, (tuple, list)) or hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return out


def linear_k(module):
    """The reduction length along the module's chain of linears (the tolerance's K)."""
    return max(64, sum(m.in_features for m in module.modules() if isinstance(m, torch.nn.Linear)))
