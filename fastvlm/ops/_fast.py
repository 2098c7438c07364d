"""The thin repeat path of a module whose fused call is a chain of plain GEMM launches (a single Linear, a LLaVA-style
Linear -> act -> Linear): once a call has taken the kernels, the next call with the same inputs launches them again
without going through the op (its key, backend choice and launchers).

A ``Chain`` is kept by the module (``fastvlm.nn``) and holds what the slow call established:

* ``token()``: the process state the backend choice read (FASTVLM_BACKEND / STRICT / CHOICE, TRITON_INTERPRET, the
  dispatch's environment check and the per-shape choice's generation) and ``allow_tf32`` (the kernel's precision);
* the input's (shape, strides, dtype, device), and each parameter *object* with its (shape, strides, dtype, device):
  ``.half()``, ``.to()`` and ``param.data = ...`` keep the object but change these; a replaced parameter
  (``load_state_dict(assign=True)``, ``lin.weight = ...``) is another object; in-place updates and
  ``load_state_dict`` (copies) change only values, which every launch reads from memory;
* the launchers' checked calls (``kernels.gemm`` ``Call``: plan, grid, integer arguments) of each step.

A call takes the chain only when all of these match and nothing per call asks for more: no open ``trace()``,
autocast off, no input needing a gradient, not under torch.compile. Otherwise ``run`` returns ``None`` and the module
takes its usual path (which reports fallbacks, records traces, applies strict mode), and installs a new chain where
the usual path ran the kernels. The tensors handed to the launch are the caller's own: a row view of ``x``
(``x.reshape(-1, K)``, a view by the key's strides) has ``x``'s data pointer, which is all a launch reads (under the
Triton interpreter, which reads more, the view is taken).
"""
from __future__ import annotations

import os

import torch

from fastvlm import _dispatch, _hot, choice
from fastvlm.ops._checks import _any_autocast, autocast_on

_NONE6, _NONE9 = (None,) * 6, (None,) * 9  # the GEMM's pointer arguments around ``a_rows`` (unused here)
_ENV = tuple(os.fsencode(n) for n in ("FASTVLM_BACKEND", "FASTVLM_STRICT", "FASTVLM_CHOICE", "TRITON_INTERPRET")) \
    if os.name == "posix" else None
STALE, PASS = object(), object()  # ``run``'s answers besides a result


def token():
    """The process state a kernel decision depends on (see the module docstring); None where it cannot be read
    cheaply (then no chain is used)."""
    data = getattr(os.environ, "_data", None)
    if _ENV is None or type(data) is not dict:
        return None
    b, s, c, i = _ENV
    return (data.get(b), data.get(s), data.get(c), data.get(i), _dispatch.environment_reasons, choice.applies,
            choice.generation, _hot.allow_tf32())


def meta(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


class Chain:
    """See the module docstring. ``steps``: ((call, weight index, bias index, up weight index or None, output
    template, row table, its version), ...) with the indices into ``params`` (the up bias follows the up weight; the
    outputs live on x's device, part of the call's key); None: the usual path did not run the kernels for this
    state (it runs again, nothing is installed)."""

    __slots__ = ("token", "x_meta", "params", "p_meta", "steps", "view", "stats")

    def __init__(self, tok, x, params, steps, a=None, copy=False, stats=None):
        from fastvlm.kernels._interp import INTERPRETING  # (triton is imported by the call that built the steps)

        self.token, self.x_meta, self.params, self.steps = tok, meta(x), tuple(params), steps
        self.p_meta = tuple(meta(p) for p in params)
        self.stats = stats  # (row_stats call, template, rms, index of the norm weight in params) of a norm first
        # what the first launch reads: x itself (its pointer is all a launch reads), or the view the launch was
        # planned for (the interpreter reads the tensor, not only its pointer), or x's rows copied (``copy``: x's
        # layout has no 2-D view, and the op read its rows from a contiguous copy, as ``reshape`` makes)
        self.view = None
        if copy:
            self.view = x.shape[-1]
        elif INTERPRETING and a is not None and a is not x:
            self.view = (tuple(a.shape), a.stride())

    def run(self, x, params):
        """The chain's result for ``x`` with the module's current ``params``, ``STALE`` when something it was built
        from changed (the module rebuilds it after its usual path), ``PASS`` when this call needs the usual path
        (nothing to rebuild)."""
        if _dispatch._open_traces or torch.compiler.is_compiling() or (_any_autocast() and autocast_on(x.device)):
            return PASS
        if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
            return PASS
        shape, stride, dtype, device = self.x_meta
        if x.shape != shape or x.stride() != stride or x.dtype is not dtype or x.device != device \
                or token() != self.token:
            return STALE
        for p, held, m in zip(params, self.params, self.p_meta):
            if p is not held:
                return STALE
            if p is not None and (p.shape != m[0] or p.stride() != m[1] or p.dtype is not m[2] or p.device != m[3]):
                return STALE
        steps = self.steps
        if steps is None:
            return PASS
        view = self.view
        a = x if view is None else x.reshape(-1, view) if type(view) is int else x.as_strided(*view, x.storage_offset())
        empty = torch.empty_like  # (of a template: one argument to parse, its shape, dtype and device)
        mean = rstd = nw = nb = None
        if self.stats is not None:  # the norm's statistics of x's rows, read by the first GEMM's prologue
            scall, like, rms, ni = self.stats
            rstd = empty(like)
            mean = None if rms else empty(like)
            scall.launch((a, rstd, rstd if mean is None else mean, rstd))
            nw, nb = params[ni], params[ni + 1]
        for call, wi, bi, ui, like, rows, version in steps:
            if rows is not None and rows._version != version:  # the row table was edited in place
                return STALE
            out = empty(like)
            if call.plan is not None:
                up, up_bias = (None, None) if ui is None else (params[ui], params[ui + 1])
                call.launch((a, params[wi], up, params[bi], up_bias, None, out, None, None, mean, rstd, nw, nb, rows,
                             *_NONE9))
            a = out
            mean = rstd = nw = nb = None
        return a


def _like(shape, dtype, device):
    """A template for ``torch.empty_like``: one element, expanded to ``shape`` (its result is a new contiguous
    tensor of that shape, dtype and device; a faster call than ``torch.empty`` with keywords)."""
    return torch.empty(1, dtype=dtype, device=device).expand(*shape)


def launched(memo, tok):
    """Mark an op's memo (its checked key's launchers) as having run the kernels under ``tok``."""
    memo["hot"] = tok


def plain_chain(x, y, params, memo, tok, a=None, rows=None, up=False, norm=None):
    """The ``Chain`` for a call of the plain linear(s) ``params`` = (w1, b1[, w2, b2]) on ``x`` that gave ``y``,
    from the op's ``memo``; a chain with no steps when that call did not run the kernels under ``tok``. ``a``: the
    2-D view of ``x`` the first launch read (default: its rows, which the launch read with unit column stride);
    ``rows``: the row table of the first launch's merged A (a layout table: fixed by x's shape and device);
    ``up``: the up weight and bias of the first launch (a gated pair, Idefics2's MLP) follow the linears' in
    ``params``; ``norm``: a norm over x's whole rows first (its weight and bias last in ``params``): True for an
    RMS norm, False for a LayerNorm."""
    steps = stats = None
    copy = False
    if a is None:
        a = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        if a.stride(-1) != 1:  # the op read a contiguous copy
            a = None
        elif a.data_ptr() != x.data_ptr():  # no 2-D view of x: its rows were copied (contiguous), per call too
            copy = a.is_contiguous()
            a = a if copy else None
    if memo is not None and memo.get("hot") == tok and tok is not None and a is not None:
        calls = [memo.get((1, False)), memo.get((2, False))][:(len(params) - 2 * up - 2 * (norm is not None)) // 2]
        if norm is not None:
            sc = memo.get((0, False))
            stats = None if sc is None or sc[0] is None else (sc[0], _like((sc[0].ints[0],), torch.float32, x.device),
                                                              norm, len(params) - 2)
            if stats is None:
                calls = [None]
        if all(c is not None and c[0] is not None for c in calls) and (copy or a.data_ptr() == x.data_ptr()):
            shapes = [(c[0].info[0], c[0].info[1]) for c in calls]
            shapes[-1] = tuple(y.shape)
            ups = (len(params) - 2 - 2 * (norm is not None) if up else None, None)
            steps = tuple((c[0], 2 * i, 2 * i + 1, u, _like(shape, c[0].info[2], x.device), t,
                           None if t is None else t._version)
                          for i, (c, shape, t, u) in enumerate(zip(calls, shapes, (rows, None), ups)))
            if not all(torch.empty_like(step[4]).is_contiguous() for step in steps) or (
                    stats is not None and not torch.empty_like(stats[1]).is_contiguous()):
                steps = None  # (a template whose empty_like is not contiguous: the usual path)
    return Chain(tok, x, params, steps, a, copy, stats if steps is not None else None)


def wanted(x, params):
    """Whether a chain may be built from this call (the conditions ``run`` reads per call hold)."""
    if _dispatch._open_traces or torch.compiler.is_compiling() or autocast_on(x.device) or _ENV is None:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad
                                                                    for p in params)))
