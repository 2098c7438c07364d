"""When and how the TMA core (kernels/gemm_tma.py) runs: eligibility, tile and split choice, and its launch.

``tma_core_reason(...)`` says why a key of ``fused_linear`` stays on the pointer kernel ("" when the TMA core can
take it); the tile and split choice is kernels/gemm_tma_schedule.py (also used by fastvlm/perfmodel.py);
``TmaCall`` is the launch object ``fused_linear`` keeps per shape key (the same ``launch(tensors)`` as
``_launch.Call``), so its repeat path is unchanged: per call it only copies the two host descriptors with the call's
base pointers (A's and W's may change between calls of one key) and, for a split tail, allocates the fp32 partials
and zeroed counters.
"""
from __future__ import annotations

import os

import triton

from fastvlm import _dispatch, _hot

from . import _launch
from ._interp import INTERPRETING
from . import gemm_tma_schedule as S
from .gemm_tma import KERNEL_ARGS, _tma_linear_kernel

def core_override():
    """FASTVLM_GEMM_CORE: "pointer" keeps every call on the pointer kernel, "tma" takes the TMA core wherever the
    layout allows (also off sm_90: the interpreter runs it), anything else ("auto") the TMA core on sm_90 only.
    Read when a shape key is first planned."""
    return os.environ.get("FASTVLM_GEMM_CORE", "auto").strip().lower()


def _has_descriptors():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401  (triton >= 3.4)
    except ImportError:
        return False
    return True


_SM90 = {}


def _is_sm90(device):
    idx = device.index if device.index is not None else 0
    ok = _SM90.get(idx)
    if ok is None:
        import torch

        ok = _SM90[idx] = torch.cuda.get_device_capability(idx)[0] == 9
    return ok


def tma_core_reason(a, weight, flags, out_dtype, norm_group):
    """"" when the TMA core can run this key, else why not. ``flags`` as ``fused_linear``'s ``_prepare`` builds them
    (has_affine, pix_mask, has_pos, taps, out_remap, a_mode, norm, has_norm_bias, norm_src, has_bias, act, gated,
    has_res, store_pre, precision)."""
    import torch

    mode = core_override()
    if mode == "pointer":
        return "FASTVLM_GEMM_CORE=pointer"
    if _hot.traced():  # a triton_op's body under torch.compile: wrap_triton traces pointer arguments
        return "traced by torch.compile: the pointer kernel"
    affine, pix, pos, _, remap, a_mode, norm, _, norm_src, _, _, gated, _, _, _, still = flags
    if a_mode != "strided":
        return f"A-mode {a_mode!r} gathers rows: pointer loads"
    if gated or pos or remap or affine or pix or norm_src or still:
        return ("epilogue or prologue variant outside the TMA core (gated pair, positions, remap, affine A or still "
                "frames)")
    if a.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != a.dtype or out_dtype != a.dtype:
        return "TMA core takes bf16/fp16 A, W and output of one dtype"
    if not _has_descriptors():
        return f"triton {triton.__version__} has no host tensor descriptors"
    if mode != "tma":
        if INTERPRETING or a.device.type != "cuda" or not _is_sm90(a.device):
            return "not an sm_90 device"
    elt = a.element_size()
    if a.stride(1) != 1 or weight.stride(1) != 1:
        return "A or W has a non-unit inner stride (TMA needs a contiguous last dimension)"
    K = a.shape[1]
    if (a.stride(0) * elt) % 16 or (weight.stride(0) * elt) % 16 or K * elt < 16:
        return "A or W row stride is not a multiple of 16 bytes (TMA)"
    if a.stride(0) < K or weight.stride(0) < K:
        return "A or W rows overlap (row stride under K): not a TMA tensor map"
    if norm != "none" and norm_group % 64:
        return "norm group not a multiple of the 64-column K tile"
    return ""


_SMS = {}


def sm_count(device):
    if device.type != "cuda":
        return S.H100_SMS
    idx = device.index if device.index is not None else 0
    n = _SMS.get(idx)
    if n is None:
        import torch

        n = _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


class TmaCall:
    """What ``fused_linear`` keeps for one shape key on the TMA core; ``launch(tensors)`` takes its 23 tensors."""

    __slots__ = ("plan", "info", "grid", "ints", "sched", "cfg", "M", "N", "K", "note", "kernels", "descs")

    def __init__(self, info, ints, cfg, sched, plan):
        self.info, self.cfg, self.sched, self.plan = info, cfg, sched, plan
        self.M, self.N, self.K = ints[0], ints[1], ints[2]
        self.ints = ints
        self.grid = (sched[0], 1, 1)
        self.kernels = {}
        self.descs = None  # (A's, W's) descriptor fields without a base pointer, after the first launch
        bm, bn = cfg[:2]
        programs, dp, split, _, tiles, _ = sched
        self.note = (f"gemm core: TMA {bm}x{bn} persistent {programs} programs, {tiles} tiles"
                     + (f", last {tiles - dp} split {split}-way over K" if split > 1 else ""))

    def launch(self, t):
        from triton.tools.tensor_descriptor import TensorDescriptor

        a, w = t[0], t[1]
        if a.data_ptr() & 15:  # TMA needs 16-byte aligned bases (a view at an odd offset): an aligned copy
            a = _aligned_copy(a)
        if w.data_ptr() & 15:
            w = _aligned_copy(w)
        if _dispatch._open_traces and _dispatch.tracing():
            annotate(self.note)
        bm, bn, bk = self.cfg[:3]
        tpl = self.descs
        if tpl is None:  # the descriptors' fields are fixed by the key (shapes, row strides): checked once here,
            M, N, K = self.M, self.N, self.K  # then copied with each call's base pointers
            tpl = self.descs = (_template(TensorDescriptor(a, [M, K], [a.stride(0), 1], [bm, bk])),
                                _template(TensorDescriptor(w, [N, K], [w.stride(0), 1], [bn, bk])))
        ad, wd = _desc(tpl[0], a), _desc(tpl[1], w)
        _, dp, split, _, tiles, _ = self.sched
        part = cnt = None
        if split > 1:
            import torch

            tail = tiles - dp
            part = torch.empty(tail * split * bm * bn, dtype=torch.float32, device=a.device)
            cnt = torch.zeros(tail, dtype=torch.int32, device=a.device)
        ptrs = (t[3], t[5], t[6], t[7], t[9], t[10], t[11], t[12], part, cnt)
        args = (ad, wd, *ptrs, *self.ints)
        plan = self.plan
        if INTERPRETING:
            plan.fn[self.grid](*args, **plan.consts)
            return
        drv = _launch._DRIVER.active
        device = drv.get_current_device()
        idx = a.get_device()
        if idx != device:
            import torch

            with torch.cuda.device(idx):
                return self.launch(t)
        spec = (device, _launch.align_key(ptrs))
        kern = self.kernels.get(spec)
        if kern is None or _launch._hooks_active():
            kern = plan.fn.run(*args, grid=self.grid, warmup=False, **plan.consts)
            if getattr(kern, "function", None) is not None and hasattr(kern, "packed_metadata"):
                self.kernels[spec] = kern
            return
        kern.run(self.grid[0], 1, 1, drv.get_current_stream(device), kern.function, kern.packed_metadata, None, None,
                 None, *args, *plan.tail)


_PLANS = {}


def _template(desc):
    """A validated descriptor's fields, its base pointer dropped (a call object must not keep a tensor alive)."""
    fields = dict(desc.__dict__)
    fields["base"] = None
    return type(desc), fields


def _desc(template, base):
    """A descriptor of ``template``'s fields over ``base`` without re-running the dataclass's checks (those of the
    first call hold for every call of the key: same shape and strides, a 16-byte aligned base): 3 us, not 12."""
    cls, fields = template
    d = object.__new__(cls)
    d.__dict__.update(fields)
    d.base = base
    return d


def _aligned_copy(x):
    """``x`` copied to fresh (16-byte aligned) memory with the same row stride, which the plan found TMA-legal."""
    import torch

    buf = torch.empty((x.shape[0], x.stride(0)), dtype=x.dtype, device=x.device)[:, :x.shape[1]]
    return buf.copy_(x)


def annotate(note):
    """Add ``note`` to the latest record of every open ``fastvlm.trace()`` of this thread (the op that called the
    GEMM recorded itself just before): the trace shows which GEMM core ran, without a record of its own."""
    for t in getattr(_dispatch._local, "stack", ()):
        if t.records:
            r = t.records[-1]
            if note not in r.note:
                r.note = f"{r.note}; {note}" if r.note else note


def make_call(info, M, N, K, strides, flags, norm_group, elem_bytes, device, config=None, sms=None):
    """The TmaCall of one key. ``strides``: (res m, res n, out m, out n, pre m, pre n); ``config`` forces a tile
    config, ``sms`` the number of SMs the schedule fills (tests shrink it to reach the split tail)."""
    norm = flags[6]
    sms = sms or sm_count(device)
    if config is not None:
        cfg, sched = tuple(config), S.schedule(M, N, K, config, sms)
    else:
        cfg, sched = S.choose(M, N, K, norm, sms, elem_bytes)
    programs, dp, split, kps, _, _ = sched
    consts = dict(NORM=norm, HAS_NORM_BIAS=flags[7], HAS_BIAS=flags[9], ACT=flags[10], HAS_RES=flags[12],
                  STORE_PRE=flags[13], HAS_SPLIT=split > 1, BLOCK_M=cfg[0], BLOCK_N=cfg[1],
                  BLOCK_K=cfg[2], GROUP_M=8, EPI_SPLIT=S.epi_split(cfg),
                  RED_N=min(64, cfg[1]), num_warps=cfg[3], num_stages=cfg[4])
    key = tuple(sorted(consts.items()))
    plan = _PLANS.get(key)
    if plan is None:
        fn = _launch.jit_function(_tma_linear_kernel)
        plan = _PLANS[key] = _launch.Plan(fn, consts, len(KERNEL_ARGS) + 14)
    ints = (M, N, K, dp, split, kps, programs, *strides, norm_group)
    return TmaCall(info, ints, cfg, sched, plan)
