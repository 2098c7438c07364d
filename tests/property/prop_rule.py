"""The rule every property test checks, as one function.

On every input the original (a transformers/timm module, or for a functional its plain-PyTorch reference) accepts,
the fused path gives the same result within the derived tolerance (fastvlm.testing ``tolerance``, ``rel_err``
against float64), with NaN and Inf (and their signs) in the same places, the same output dtype and shape, and no
input mutated; on every input the original rejects, the fused path raises the original's error type or an error
whose message names the tensor at fault.

Where the original itself, in its own dtype, is not within the bound of the float64 result (an ill-conditioned input,
overflow of a norm's statistics), the fused path must be as close to float64 as the original (within a factor 2), or
match the original within the bound.
"""
import collections
import math
import os

import torch

import fastvlm

from fastvlm.testing import rel_err, tolerance

from fastvlm._dispatch import FastVLMFallbackError

try:  # the interpreter's bounds checker (CPU machines only)
    from interp_guard import OutOfBoundsAccess
except ImportError:  # pragma: no cover
    class OutOfBoundsAccess(AssertionError):
        pass


class RuleViolation(AssertionError):
    pass


STATS = collections.Counter()  # per test: examples accepted / rejected by the original, and which backends ran


def tensors_in(obj):
    """Every tensor inside nested tuples / lists / dicts / ModelOutputs, in a stable order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict) or hasattr(obj, "to_tuple"):
        items = obj.to_tuple() if hasattr(obj, "to_tuple") else [obj[k] for k in sorted(obj, key=str)]
        return [t for v in items for t in tensors_in(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensors_in(v)]
    return []


def _bits(t):
    t = t.detach()
    if t.device.type == "meta" or t.numel() == 0:
        return (tuple(t.shape), t.dtype)
    return (tuple(t.shape), t.dtype, t.reshape(-1).clone().view(torch.uint8) if t.dtype != torch.bool else t.clone())


def snapshot(args):
    return [(t, _bits(t), tuple(t.stride())) for t in tensors_in(args)]


def assert_unmutated(snap, who):
    for i, (t, bits, stride) in enumerate(snap):
        now = _bits(t)
        same = len(now) == len(bits) and all((torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)
                                             for a, b in zip(now, bits))
        if not same or tuple(t.stride()) != stride:
            raise RuleViolation(f"{who} mutated input #{i} (shape {tuple(t.shape)}, {t.dtype})")


def call(fn, *args, **kwargs):
    """("ok", result) or ("err", exception). Bounds-checker hits are never an accepted outcome: they re-raise."""
    try:
        return "ok", fn(*args, **kwargs)
    except (OutOfBoundsAccess, RuleViolation):
        raise
    except Exception as exc:  # noqa: BLE001 - the rule compares what each side raises
        return "err", exc


def _masks(t):
    t = t.detach()
    if not t.is_floating_point():
        return None, None, None
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


def compare(out, orig, ref64, dtype, k, roundings, what="output", mag64=None, factor=2):
    """``out`` (fused) against ``orig`` (the original in the input dtype) and ``ref64`` (the original in float64).
    ``mag64``: the original in float64 at the absolute values of the inputs (the sum of absolute terms of each
    output): with it, an error within the bound relative to that magnitude passes too (a result that cancels)."""
    if tuple(out.shape) != tuple(orig.shape):
        raise RuleViolation(f"{what}: shape {tuple(out.shape)}, the original gives {tuple(orig.shape)}")
    if out.dtype != orig.dtype:
        raise RuleViolation(f"{what}: dtype {out.dtype}, the original gives {orig.dtype}")
    if not out.is_floating_point():
        if not torch.equal(out, orig):
            raise RuleViolation(f"{what}: integer/bool result differs from the original")
        return
    names = ("NaN", "+Inf", "-Inf")
    # where the original overflowed an intermediate in its dtype (NaN / Inf where float64 gives a value in the dtype's
    # range) and the fused path gives that value, the fused path is not asked to reproduce the overflow
    spared = torch.zeros(out.shape, dtype=torch.bool)
    if ref64 is not None:
        spared = ~torch.isfinite(orig) & torch.isfinite(ref64) & torch.isfinite(out) & \
            (ref64.abs() <= torch.finfo(out.dtype).max)
        if spared.any():
            STATS["original overflowed, fused finite"] += 1
    for name, a, b in zip(names, _masks(out), _masks(orig)):
        if not torch.equal(a, b & ~spared):
            idx = (a != (b & ~spared)).nonzero()[:4].tolist()
            raise RuleViolation(f"{what}: {name} in different places than the original: fused {int(a.sum())}, "
                                f"original {int(b.sum())} (first differing indices {idx})")
    fin = torch.isfinite(orig) | spared
    if not fin.any():
        return
    bound = tolerance(dtype, max(int(k), 1), roundings)
    err64 = rel_err(out[fin], ref64[fin]) if ref64 is not None and torch.isfinite(ref64[fin]).all() else math.inf
    if err64 <= bound:
        return
    # the original itself is off the float64 result by more than the bound (an ill-conditioned input, overflowing
    # statistics): then the fused path may be as far off as the original (within a factor 2), or match it
    if mag64 is not None and tuple(mag64.shape) == tuple(out.shape) and torch.isfinite(mag64[fin]).all():
        den = float(mag64[fin].double().norm())
        if den > 0 and float((out[fin].double() - ref64[fin].double()).norm()) / den <= bound:
            return
    fin_o = fin & ~spared  # the original's own values
    err_orig64 = rel_err(orig[fin_o], ref64[fin_o]) if ref64 is not None else math.inf
    err_orig = rel_err(out[fin_o], orig[fin_o])
    if err_orig64 > bound and (err_orig <= bound or err64 <= factor * err_orig64 + bound):
        return
    raise RuleViolation(f"{what}: relative error {err64:.3e} vs float64 > bound {bound:.3e} ({dtype}, K={k}); "
                        f"vs the original {err_orig:.3e}; the original vs float64 {err_orig64:.3e}")


def _f64(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _f64(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_f64(v) for v in obj)
    return obj


def _layout_only(exc):
    return isinstance(exc, RuntimeError) and "view size is not compatible with input tensor's size and stride" in str(exc)


def _contiguous(obj):
    if isinstance(obj, torch.Tensor):
        return obj.contiguous()
    if isinstance(obj, dict):
        return {k: _contiguous(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_contiguous(v) for v in obj)
    return obj


def _abs(obj):
    if isinstance(obj, torch.Tensor):
        return obj.abs() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _abs(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_abs(v) for v in obj)
    return obj


def names_tensor(exc, names):
    msg = str(exc)
    return any(n in msg for n in names)


def check(fused, original, args, *, original64=None, args64=None, dtype=None, k=1, roundings=2, names=(),
          pick=lambda r: r, kwargs=None, kwargs64=None, same_error_only=False):
    """Apply the rule to one input. ``fused`` / ``original`` are callables of ``*args, **kwargs``; ``original64`` the
    original in float64 (called with ``args64``); ``pick`` extracts the tensor(s) to compare from a result; ``names``:
    tensor names an error message may name instead of raising the original's error type.
    Returns ("ok", fused result) or ("err", the fused path's exception)."""
    kwargs = kwargs or {}
    snap = snapshot((args, kwargs))
    r_orig = call(original, *args, **kwargs)
    if r_orig[0] == "err" and _layout_only(r_orig[1]):
        # the original's ``view`` refuses this memory layout: a layout restriction, not a rule about the values; the
        # fused path may accept the input if it then equals the original on a contiguous copy
        args, kwargs = _contiguous(args), _contiguous(kwargs)
        r_orig = call(original, *args, **kwargs)
        args64, kwargs64 = _contiguous(args64), _contiguous(kwargs64)
    with fastvlm.trace() as tr:
        r_fused = call(fused, *args, **kwargs)
    STATS["rejected" if r_orig[0] == "err" else "accepted"] += 1
    for b in set(tr.backends()):
        STATS[f"ran {b}"] += 1
    assert_unmutated(snap, "the fused path or the original")
    if r_fused[0] == "err":
        _other_path_raises_alike(fused, args, kwargs, r_fused[1])
    if r_orig[0] == "err":
        if r_fused[0] == "ok":
            raise RuleViolation(f"the original rejects this input ({type(r_orig[1]).__name__}: {r_orig[1]}) but "
                                f"the fused path accepts it")
        exc, oexc = r_fused[1], r_orig[1]
        if isinstance(exc, type(oexc)) or (not same_error_only and names_tensor(exc, names)):
            return r_fused
        raise RuleViolation(f"the original raises {type(oexc).__name__}: {oexc}; the fused path raises "
                            f"{type(exc).__name__}: {exc}") from exc
    if r_fused[0] == "err":
        raise RuleViolation(f"the original accepts this input, the fused path raises {type(r_fused[1]).__name__}: "
                            f"{r_fused[1]}") from r_fused[1]
    outs, origs = tensors_in(pick(r_fused[1])), tensors_in(pick(r_orig[1]))
    refs = [None] * len(origs)
    if original64 is not None:
        with torch.no_grad():
            refs = tensors_in(pick(original64(*_contiguous(args64), **_contiguous(
                kwargs64 if kwargs64 is not None else _f64(kwargs)))))
    if len(outs) != len(origs):
        raise RuleViolation(f"the fused path returns {len(outs)} tensors, the original {len(origs)}")
    for i, (o, r, r64) in enumerate(zip(outs, origs, refs)):
        try:
            compare(o, r, r64, dtype or r.dtype, k, roundings, what=f"output #{i}")
        except RuleViolation:
            if original64 is None:
                raise
            with torch.no_grad():
                mags = tensors_in(pick(original64(*_contiguous(_abs(args64)), **_contiguous(_abs(
                    kwargs64 if kwargs64 is not None else _f64(kwargs))))))
            compare(o, r, r64, dtype or r.dtype, k, roundings, what=f"output #{i}", mag64=mags[i].abs())
    return r_fused


def _other_path_raises_alike(fused, args, kwargs, exc):
    """The two paths behave identically: where this path raises, the other raises the same error type."""
    path = os.environ.get("FASTVLM_BACKEND")
    if path not in ("torch", "triton") or os.environ.get("TRITON_INTERPRET") != "1":
        return
    other = "triton" if path == "torch" else "torch"
    os.environ["FASTVLM_BACKEND"] = other
    try:
        r = call(fused, *args, **kwargs)
    finally:
        os.environ["FASTVLM_BACKEND"] = path
    if r[0] == "ok":
        if other == "triton" and isinstance(exc, FastVLMFallbackError):
            return
        raise RuleViolation(f"the {path} path raises {type(exc).__name__}: {exc}; the {other} path accepts the input")
    if other == "triton" and isinstance(r[1], FastVLMFallbackError):
        return  # an input the kernels do not take (a dtype): FASTVLM_BACKEND=triton refuses it by design
    if type(r[1]) is not type(exc):
        raise RuleViolation(f"the {path} path raises {type(exc).__name__}: {exc}; the {other} path raises "
                            f"{type(r[1]).__name__}: {r[1]}")


def is_fallback_error(exc):
    return isinstance(exc, FastVLMFallbackError)


def _grads_of(fn, leaves, gy_seed, cast=None, contiguous=False):
    """(gradient of each leaf, (||output gradient||, ||output||)) of ``fn(dict of leaves)`` for a seeded random output
    gradient."""
    ts = {n: (cast(t) if cast else t).detach().clone() for n, t in leaves.items()}
    if contiguous:  # the originals (their ``view``s) get contiguous copies; the fused path the drawn layouts
        ts = {n: t.contiguous() for n, t in ts.items()}
    ts = {n: t.requires_grad_() for n, t in ts.items()}
    y = fn(ts)
    outs = [t for t in tensors_in(y) if t.is_floating_point() and t.requires_grad]
    g = torch.Generator().manual_seed(gy_seed)
    gys = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    names = list(ts)
    if not outs:
        return {n: None for n in names}, (0.0, 0.0)
    grads = torch.autograd.grad(outs, [ts[n] for n in names], gys, allow_unused=True)
    norm = lambda ts_: math.sqrt(sum(float(t.double()[torch.isfinite(t)].norm()) ** 2 for t in ts_))  # noqa: E731
    return dict(zip(names, grads)), (norm(gys), norm([o.detach() for o in outs]))


def check_grads(fused, original, leaves, *, dtype, k, roundings, gy_seed=0):
    """Gradients of every leaf (a dict name -> float tensor) through ``fused(dict)`` against ``original(dict)`` in
    float64, with the original in the leaves' dtype as the yardstick for ill-conditioned cases (as ``compare``, with
    a factor 4: a backward recomputes from saved statistics, a few more roundings than autograd's).

    A gradient that cancels to (near) zero is judged against the scale its terms have before they cancel:
    ||dL/dy|| ||y|| / ||leaf|| (or, where y = 0, max(||dL/dy||, ||all gradients||)), so rounding noise of that scale
    on a structural zero (softmax over one key, a scale-invariant norm's input, a LayerNorm over one element) is not a
    mismatch."""
    try:
        orig, _ = _grads_of(original, leaves, gy_seed, contiguous=True)
    except Exception:  # noqa: BLE001 - inputs the original rejects are the value tests' business
        from hypothesis import reject

        STATS["grads: rejected by the original"] += 1
        reject()
    got, _ = _grads_of(fused, leaves, gy_seed)
    ref, (gy_norm, y_norm) = _grads_of(original, leaves, gy_seed, cast=lambda t: t.double(), contiguous=True)
    total = math.sqrt(sum(float(t[torch.isfinite(t)].norm()) ** 2 for t in ref.values() if t is not None))
    for n in leaves:
        g, o, r = got[n], orig[n], ref[n]
        if r is None or o is None:
            if g is not None and g.any():
                raise RuleViolation(f"gradient of {n}: nonzero where the original has none")
            continue
        if g is None:
            raise RuleViolation(f"gradient of {n}: missing (the original has one)")
        try:
            compare(g, o, r, dtype, k, roundings, what=f"gradient of {n}", factor=4)
        except RuleViolation:
            fin = torch.isfinite(r) & torch.isfinite(g)
            spared = ~torch.isfinite(o) & torch.isfinite(r) & torch.isfinite(g)
            same_masks = all(torch.equal(a, b & ~spared) for a, b in zip(_masks(g), _masks(o)))
            leaf = float(leaves[n].double()[torch.isfinite(leaves[n])].norm())
            scale = gy_norm * y_norm / leaf if leaf > 0 else 0.0  # the size of dL/dleaf for y homogeneous in leaf
            scale = scale if scale > 0 else max(gy_norm, total)  # y = 0 (a LayerNorm over one element): no size
            err = float((g[fin].double() - r[fin]).norm())
            if same_masks and err <= tolerance(dtype, max(int(k), 1), roundings) * scale:
                continue
            raise
