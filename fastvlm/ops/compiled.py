"""torch.compile launches fastvlm's Triton kernels itself: every fused op has a ``torch.library.triton_op`` twin.

An opaque custom op (``torch.library.custom_op``) is one node of the compiled graph that runs fastvlm's launcher at
run time: its host work stays, and Inductor cannot put it in a CUDA graph. For each fused op ``fastvlm::NAME`` this
module registers ``fastvlm::NAME_launch``, a ``triton_op`` with the same schema, the same autograd (the op's own
backward, in PyTorch ops) and, as its body, the op's own implementation run inside ``kernels._launch.traced()``: when
torch.compile traces the body (on fake / functional tensors) every launch of the eager launchers becomes
``wrap_triton(kernel)[grid](...)`` with the plan's constexprs, so the graph holds the kernel calls
(``triton_kernel_wrapper_functional``) with the arguments the eager launcher passes, and Inductor launches them
with its own launcher (and captures them in ``mode="reduce-overhead"``'s CUDA graphs). Glue the op does around its
launches (``torch.empty``, views, a row table) is traced as aten ops. docs/design-launch.md, "torch.compile".

While compiling, an op's functional calls ``op_for(op, x, named)``: the twin when the Triton kernels would run and
can be traced, else the opaque op, which decides and reports at run time as before. The twin is not taken
(``reasons``), or hands over to the opaque op, for:

* ``FASTVLM_COMPILE_LAUNCH=op`` (read when tracing): the opaque op for every call;
* a call the kernels cannot run (FASTVLM_BACKEND=torch, the device, dtypes, autocast): the opaque op keeps the
  run-time fallback, its warning and strict mode;
* the Triton interpreter (TRITON_INTERPRET=1, the CPU tests): its kernels are Python functions that ``wrap_triton``
  cannot trace;
* symbolic shapes (dynamic=True, or a recompile with automatic dynamic shapes): the launchers key their checks and
  plans on concrete sizes and strides, so the twin's body calls the opaque op itself (it stays in the graph).

Inside a twin the backend rule is applied when the graph is traced (a change of FASTVLM_BACKEND after that needs
``torch._dynamo.reset()``); a per-shape choice (fastvlm.choice) is not timed there (the kernel is taken); an
autotuned kernel takes its config by rule, not timed (``kernels._launch.rule_config``).
"""
from __future__ import annotations

import torch

from fastvlm import _dispatch
from fastvlm.ops import _checks

MODES = ("inductor", "op")
SUFFIX = "_launch"
TWINS = {}  # "fastvlm::NAME" -> the triton_op twin (CustomOpDef)


def launch_mode() -> str:
    value = _dispatch.getenv("FASTVLM_COMPILE_LAUNCH", "inductor").strip().lower() or "inductor"
    if value not in MODES:
        raise ValueError(f"FASTVLM_COMPILE_LAUNCH must be one of {MODES}, got {value!r}")
    return value


def register(op):
    """Register the ``triton_op`` twin of custom op ``op`` (a CustomOpDef whose autograd is registered already);
    returns it."""
    from torch.library import triton_op

    impl = op._init_fn

    def body(*args, **kwargs):
        from fastvlm.kernels import _launch

        if _symbolic(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)):
            return getattr(torch.ops.fastvlm, op._name)(*args, **kwargs)  # the opaque op, in the graph
        with _launch.traced():
            return impl(*args, **kwargs)

    body.__name__ = body.__qualname__ = op._name + SUFFIX
    body.__doc__ = f"``{op._qualname}`` with its launches traced (fastvlm.ops.compiled)."
    twin = triton_op(op._qualname + SUFFIX, body, mutates_args=(), schema=op._schema)
    if op._backward_fn is not None:
        twin.register_autograd(op._backward_fn, setup_context=op._setup_context_fn)
    TWINS[op._qualname] = twin
    return twin


def _symbolic(tensors):
    """Whether a size or stride is symbolic (read in the twin's body, where sizes are SymInts: Dynamo's own tracing
    of the functional treats them as ints)."""
    return any(isinstance(s, torch.SymInt) for t in tensors for s in (*t.shape, *t.stride()))


def _interpreting():
    from fastvlm.kernels._interp import INTERPRETING

    return INTERPRETING


def reasons(x, named=()):
    """Why a compiled call reading ``x`` and ``named`` ((name, tensor or None) pairs) keeps the opaque op; empty
    when the twin is taken."""
    if launch_mode() != "inductor":
        return ["FASTVLM_COMPILE_LAUNCH=op"]
    if _dispatch.requested_backend() == "torch":
        return ["FASTVLM_BACKEND=torch"]
    why = _dispatch.environment_reasons(x.device)  # (first: it says when triton is missing)
    if not why and _interpreting():
        return ["the Triton interpreter's kernels cannot be traced by wrap_triton"]
    if _checks.autocast_on(x.device):
        why = why + ["autocast is on"]
    return why + _dispatch.dtype_device_reasons(x, named)


def op_for(name, x, named=()):
    """The op a compiled call of ``name`` ("fastvlm::NAME") takes: its twin, or (with ``reasons``) the opaque op."""
    twin = TWINS.get(name)
    target = torch.ops.fastvlm
    short = name.split("::", 1)[1]
    if twin is not None and not reasons(x, named):
        return getattr(target, short + SUFFIX)
    return getattr(target, short)
