"""Backend choice, explained fallbacks and ``fastvlm.trace()``.

Every op asks ``choose_backend(op, device, reasons)`` once per call. ``reasons`` are the op's own reasons why its
Triton kernel cannot run these inputs (dtype, shapes, unsupported options); this module adds the environment's
(device, Triton importable, FASTVLM_BACKEND). The answer is "triton" or "torch" (the plain-PyTorch path):

* FASTVLM_BACKEND=auto (default): Triton on CUDA tensors when nothing forbids it, else the PyTorch path. A fallback
  is reported once per (op, reasons) as a ``FastVLMFallbackWarning``; FASTVLM_STRICT=1 turns it into an error that
  lists every reason. Ops with a per-shape choice (fastvlm.choice) may run their PyTorch path where it was timed
  faster at that shape (recorded in trace(), no warning).
* FASTVLM_BACKEND=triton: Triton or an error (never a fallback). On CPU tensors this needs TRITON_INTERPRET=1 set
  before triton is imported: the real kernels then run in the Triton interpreter, which is how CI checks them.
* FASTVLM_BACKEND=torch: always the PyTorch path (an explicit choice, so no warning; trace() still records it).

The environment is read at every call, so tests and users can switch backends without re-importing.
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastvlm import _hot
from fastvlm._table import text_table


class FastVLMFallbackWarning(UserWarning):
    """A fastvlm op ran its PyTorch path instead of its kernel; the message says why."""


class FastVLMFallbackError(RuntimeError):
    """Raised under FASTVLM_STRICT=1 (or FASTVLM_BACKEND=triton) when the fast path cannot run."""


BACKENDS = ("auto", "triton", "torch")


# os.environ's own dict (bytes keys on POSIX), read directly on the hot path: ``os.environ.get`` encodes the name and
# goes through two Python-level mapping methods per read, a few µs per op call. Same values (os.environ's setters
# and deleters update this dict); anywhere else (Windows, another mapping put in os.environ's place) ``get`` is used.
_ENV_KEYS = {n: os.fsencode(n) for n in ("FASTVLM_BACKEND", "FASTVLM_STRICT", "TRITON_INTERPRET",
                                                "FASTVLM_SCATTER", "FASTVLM_COMPILE_LAUNCH", "FASTVLM_CHOICE",
                                                "FASTVLM_FP32_PRECISION")} \
    if os.name == "posix" else {}


def getenv(name: str, default: str) -> str:
    """``os.environ.get(name, default)``, read at every call (see ``_ENV_KEYS``)."""
    try:
        raw = os.environ._data.get(_ENV_KEYS[name])
    except (AttributeError, KeyError, TypeError):
        return os.environ.get(name, default)
    if raw is None:
        return default
    return raw if type(raw) is str else os.fsdecode(raw)


def requested_backend() -> str:
    value = getenv("FASTVLM_BACKEND", "auto")
    if value == "auto":
        return value
    value = value.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FASTVLM_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def strict() -> bool:
    return getenv("FASTVLM_STRICT", "0") not in ("", "0", "false", "False")


def interpreter_enabled() -> bool:
    return getenv("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(importable, why not). Cached: triton's importability does not change within a process."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401

        from fastvlm.kernels import gemm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return False, f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return True, ""


def environment_reasons(device) -> list[str]:
    """Why the Triton kernels cannot run on tensors of ``device`` in this process (empty when they can)."""
    ok, why = triton_status()
    if device.type == "cuda":
        return [] if ok else [why]
    if device.type == "cpu":
        if not interpreter_enabled():
            return ["tensors are on cpu: the Triton kernels need a CUDA device (or FASTVLM_BACKEND=triton with "
                    "TRITON_INTERPRET=1 to run them in the Triton interpreter)"]
        if requested_backend() != "triton":
            return ["tensors are on cpu: the Triton interpreter runs only when FASTVLM_BACKEND=triton"]
        return [] if ok else [why]
    return [f"tensors are on {device.type}: fastvlm kernels support CUDA only"]


# ---------------------------------------------------------------- recording


@dataclass
class OpRecord:
    op: str
    backend: str
    reasons: tuple[str, ...] = ()
    detail: str = ""
    note: str = ""  # the per-shape choice's verdict when it timed this shape (fastvlm.choice)


@dataclass
class Trace:
    """Records of the fastvlm ops called inside a ``fastvlm.trace()`` block by the thread that opened it.
    ``print(trace)`` gives a table."""

    records: list[OpRecord] = field(default_factory=list)

    def __str__(self) -> str:
        if not self.records:
            return "fastvlm.trace: no fastvlm op was called"
        rows = [("op", "backend", "shapes", "fallback reason / choice")]
        rows += [(r.op, r.backend, r.detail, "; ".join(r.reasons) or r.note or "-") for r in self.records]
        return text_table(rows)

    __repr__ = __str__

    def backends(self) -> list[str]:
        return [r.backend for r in self.records]


_local = threading.local()
_open_traces = 0  # traces open in any thread: while 0, ``tracing()`` reads no thread-local state
_warned: set = set()
_warn_lock = threading.Lock()


@contextmanager
def trace():
    """Record every fastvlm op called inside the block by this thread: op name, backend that ran, fallback reasons.

    Per thread: calls made by other threads at the same time (a server's thread pool sharing the model, workers
    started inside the block) are not recorded here; each thread opens its own trace. Traces nest: an op is recorded
    in every trace its thread has open."""
    global _open_traces
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    t = Trace()
    with _warn_lock:
        _open_traces += 1
    stack.append(t)
    try:
        yield t
    finally:
        stack.remove(t)
        with _warn_lock:
            _open_traces -= 1


def _record(rec: OpRecord) -> None:
    for t in getattr(_local, "stack", ()):
        t.records.append(rec)


def tracing() -> bool:
    """Whether this thread has a ``trace()`` open (a call builds its record only then)."""
    return bool(_open_traces and getattr(_local, "stack", None))


def _detail(detail) -> str:
    """``detail`` may be a string or a callable making one (built only when a trace records it or a fallback
    reports it)."""
    return detail() if callable(detail) else detail


def report_fallback(op: str, reasons, detail="", explicit: bool = False) -> None:
    """Record a PyTorch-path call and warn (once per op and reasons) or raise under FASTVLM_STRICT=1."""
    reasons = tuple(reasons)
    if tracing():
        _record(OpRecord(op, "torch", reasons, _detail(detail)))
    if explicit:
        return
    if strict():
        raise FastVLMFallbackError(f"fastvlm op {op} cannot take its fast path (FASTVLM_STRICT=1):\n"
                                   + "\n".join(f"  - {r}" for r in reasons))
    key = (op, reasons)
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    what = "its PyTorch path" if op.startswith("fastvlm::") else "the original implementation"  # a fused module
    warnings.warn(f"fastvlm: {op} ran {what}: " + "; ".join(reasons), FastVLMFallbackWarning, stacklevel=3)


def choose_backend(op: str, device, reasons=(), detail="", choice=None) -> str:
    """Pick "triton" or "torch" for one call of ``op`` (see the module docstring for the rules). ``detail``: a string
    or a callable making one, for trace() and fallback messages (called only when one is made). ``choice``: for ops
    with a per-shape choice (fastvlm.choice), a callable returning its entry, called only where the choice applies
    (FASTVLM_BACKEND=auto, not strict, the kernel able to run, ``fastvlm.choice.applies(device)``)."""
    req = requested_backend()
    if req == "torch":
        report_fallback(op, ("FASTVLM_BACKEND=torch",), detail, explicit=True)
        return "torch"
    env = environment_reasons(device)
    if not reasons and not env:
        note = ""
        if choice is not None and req == "auto" and not strict() and not _hot.traced():  # (traced: nothing timed)
            from fastvlm import choice as per_shape

            if per_shape.applies(device):
                entry = choice()
                note = per_shape.describe(entry)
                if entry["winner"] == per_shape.EAGER:  # a performance choice, not a fallback: no warning
                    if tracing():
                        _record(OpRecord(op, "torch", (), _detail(detail), note))
                    return "torch"
        if tracing():
            _record(OpRecord(op, "triton", (), _detail(detail), note))
        return "triton"
    all_reasons = list(reasons) + env
    if req == "triton":
        raise FastVLMFallbackError(f"FASTVLM_BACKEND=triton but {op} cannot run its Triton kernel:\n"
                                   + "\n".join(f"  - {r}" for r in all_reasons))
    report_fallback(op, all_reasons, detail)
    return "torch"


def reset_warnings() -> None:
    """Forget which fallbacks were already reported (tests use it)."""
    with _warn_lock:
        _warned.clear()


KERNEL_DTYPES = ("float16", "bfloat16", "float32")  # what the Triton kernels compute in (names: no torch import here)


def dtype_device_reasons(x, named, what="x"):
    """Why a kernel reading ``x`` and the ``named`` (name, tensor or None) operands cannot run: a dtype without a
    kernel, operands of another dtype or on another device. Empty when it can."""
    reasons = []
    if str(x.dtype).replace("torch.", "") not in KERNEL_DTYPES:
        reasons.append(f"{what} dtype {x.dtype} is not one of float16/bfloat16/float32")
    for name, t in named:
        if t is None:
            continue
        if t.dtype != x.dtype:
            reasons.append(f"{name} is {t.dtype} but {what} is {x.dtype} (the kernel needs one dtype)")
        if t.device != x.device:
            reasons.append(f"{name} is on {t.device} but {what} is on {x.device}")
    return reasons
