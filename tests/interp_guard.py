"""Make the Triton interpreter strict (tests only; private triton API checked on triton 3.6 and 3.8).

* Bounds checker: every masked load/store/atomic of an interpreted launch must stay inside the byte span of one of
  the launch's tensor arguments; otherwise an ``OutOfBoundsAccess`` names the op, the number of bad lanes and the
  first bad address. (The interpreter itself never faults: it reads or writes neighbouring host memory.)
* ``debug=True`` for the interpreter builder: turns on ``tl.device_assert`` and the int32 overflow sanitizer.
"""
import dataclasses
import threading

import numpy as np


class OutOfBoundsAccess(AssertionError):
    pass


_state = threading.local()


def _spans_of(obj, out):
    if isinstance(obj, (tuple, list)):
        for o in obj:
            _spans_of(o, out)
        return
    base = getattr(obj, "base", None)
    if base is not None and hasattr(base, "data_ptr") and not hasattr(obj, "data_ptr"):
        obj = base  # TensorDescriptor
    if not hasattr(obj, "data_ptr") or not hasattr(obj, "stride") or obj.numel() == 0:
        return
    extent = sum((s - 1) * st for s, st in zip(obj.shape, obj.stride())) + 1
    lo = obj.data_ptr()
    out.append((lo, lo + extent * obj.element_size()))


def _check(op, ptrs, mask, elem_bytes):
    spans = getattr(_state, "spans", None)
    if not spans:
        return
    addr = np.asarray(ptrs, dtype=np.uint64)
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask, dtype=bool), addr.shape)
        addr = addr[m]
    else:
        addr = addr.reshape(-1)
    if addr.size == 0:
        return
    ok = np.zeros(addr.shape, dtype=bool)
    for lo, hi in spans:
        ok |= (addr >= lo) & (addr + elem_bytes <= hi)
    if not ok.all():
        bad = addr[~ok]
        nearest = min(spans, key=lambda s: min(abs(int(bad[0]) - s[0]), abs(int(bad[0]) - s[1])))
        raise OutOfBoundsAccess(f"{op}: {bad.size} lane(s) outside every tensor argument; first bad address is "
                                f"{int(bad[0]) - nearest[0]:+d} bytes from the start of the nearest argument "
                                f"(span {nearest[1] - nearest[0]} bytes)")


def install():
    from triton.runtime import interpreter as I

    if getattr(I.InterpreterBuilder, "_fastvlm_guard", False):
        return
    I.InterpreterBuilder._fastvlm_guard = True
    b = I.interpreter_builder
    b.options = dataclasses.replace(b.options, debug=True)

    orig_init = I.GridExecutor._init_args_hst

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        spans = []
        _spans_of(list(args_hst), spans)
        _spans_of(list(kwargs_hst.values()), spans)
        _state.spans = spans
        return args_hst, kwargs_hst

    I.GridExecutor._init_args_hst = init_args

    def itemsize(ptrs):
        return np.dtype(I._get_np_dtype(ptrs.get_element_ty())).itemsize

    orig_load = I.InterpreterBuilder.create_masked_load

    def load(self, ptrs, mask, other, *a, **k):
        _check("load", ptrs.data, mask.data if mask is not None else None, itemsize(ptrs))
        return orig_load(self, ptrs, mask, other, *a, **k)

    orig_store = I.InterpreterBuilder.create_masked_store

    def store(self, ptrs, value, mask, *a, **k):
        _check("store", ptrs.data, mask.data if mask is not None else None, itemsize(ptrs))
        return orig_store(self, ptrs, value, mask, *a, **k)

    orig_rmw = I.InterpreterBuilder.create_atomic_rmw

    def rmw(self, op, ptr, val, mask, *a, **k):
        _check("atomic_rmw", ptr.data, mask.data if mask is not None else None, itemsize(ptr))
        return orig_rmw(self, op, ptr, val, mask, *a, **k)

    orig_cas = I.InterpreterBuilder.create_atomic_cas

    def cas(self, ptr, cmp, val, *a, **k):
        _check("atomic_cas", ptr.data, None, itemsize(ptr))
        return orig_cas(self, ptr, cmp, val, *a, **k)

    I.InterpreterBuilder.create_masked_load = load
    I.InterpreterBuilder.create_masked_store = store
    I.InterpreterBuilder.create_atomic_rmw = rmw
    I.InterpreterBuilder.create_atomic_cas = cas
