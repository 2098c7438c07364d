"""Launch plans: a repeat call makes no decision again, it looks its plan up and launches.

A launcher (the Python function beside each kernel) keys its plans on what decides the launch: the op's shape key,
dtypes, layout class and flags. A ``Plan`` holds everything those decide once:

* the constexprs (flags, the autotuned block sizes and warps resolved *once per key*, the heuristics' values) and
  the compile options, so the ``@triton.autotune`` / ``@triton.heuristics`` wrappers never run on a repeat call;
* the compiled kernel per argument specialisation (Triton specialises on each pointer's 16-byte alignment and each
  integer's ``== 1`` / ``% 16 == 0`` / 32-bit range; ``spec_key`` computes a key at least that fine), launched
  directly: ``CompiledKernel.run(grid, stream, function, metadata, ..., *args, *constexprs)``, the call Triton's own
  ``JITFunction.run`` ends with, without re-binding ~60 arguments or rebuilding its cache key. On triton 3.8 one
  step further: the driver's launch function itself (``utils.launch``, the C call ``CudaLauncher.__call__`` ends
  with), with the launcher's argument annotations and signature read once per compiled kernel (``direct_launch``:
  only for kernels that need no scratch memory and no tensor descriptors; any other version or case keeps
  ``CompiledKernel.run`` and says why in ``Plan.paths``).

Kernels get ``None`` for the pointers and strides their variant does not read (a constexpr ``None``: not
specialised, not passed to the GPU).

The first call of a key (and of a new specialisation) goes through ``JITFunction.run``, which compiles and launches
and returns the compiled kernel. Launch hooks (a profiler's ``knobs.runtime.launch_enter_hook``) and the Triton
interpreter always take that path, so they see every launch as before.

Device: Triton launches (and compiles, and autotunes) on the *current* CUDA device, whatever device the arguments are
on. Each launch compares the first tensor argument's device index (``Tensor.get_device``, -1 on the CPU) with the
current one and, only when they differ, makes the tensor's device current for the launch (``torch.cuda.device``), as
a torch op would: one integer comparison on the usual path.

Thread safety: plans and kernels are stored only once complete (a dict assignment), so a reader never sees a
half-built entry; two threads missing the same key both build it and one result wins. Autotuning runs under one
lock (the autotuner object keeps per-call state of its own).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import triton

from fastvlm import _hot
from fastvlm._hot import MAX_ENTRIES, tensors_key  # noqa: F401  (launchers key their calls with these)

from ._interp import INTERPRETING

# Launches off the plan path: the interpreter's, and those traced by torch.compile (``traced``; meanwhile other
# threads' launches take ``JITFunction.run``). One flag: the eager repeat path pays one check for both.
_SPECIAL = INTERPRETING

_tune_lock = threading.Lock()
_I32_LO, _I32_HI = -(2 ** 31), 2 ** 31


@contextmanager
def traced():
    """This thread's launches in this block are traced by torch.compile (a ``triton_op``'s body): each becomes
    ``wrap_triton(kernel)[grid](...)`` with the plan's constexprs; autotuned plans take a config by rule, and no
    launcher cache keeps what is built here (``remember``). kernels/_traced.py, docs/design-launch.md."""
    global _SPECIAL, _tracing
    local = _hot._traced
    local.depth = getattr(local, "depth", 0) + 1
    with _trace_lock:
        _tracing += 1
        _SPECIAL = True
    try:
        yield
    finally:
        local.depth -= 1
        with _trace_lock:
            _tracing -= 1
            _SPECIAL = INTERPRETING or _tracing > 0


_trace_lock = threading.Lock()
_tracing = 0  # threads inside ``traced()``


def remember(cache, key, value):
    """``cache[key] = value`` (bounded, see fastvlm._hot.remember); nothing is stored while launches are traced."""
    if not _hot.traced():
        _hot.remember(cache, key, value)


def cdiv(a, b):
    """``triton.cdiv`` for Python ints without its constexpr wrapper (a launch computes a few per call)."""
    return -(-a // b)


def next_pow2(n):
    """``triton.next_power_of_2`` for Python ints (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


_U64 = 2 ** 63


def spec_key(args):
    """A key that changes whenever Triton's specialisation of ``args`` could: a tensor's dtype and its pointer's
    16-byte alignment, an integer's value 1, divisibility by 16 and width (i32 / i64 / u64). Anything but ints,
    floats, bools and None is treated as a tensor."""
    key = []
    for a in args:
        if a is None:
            key.append(None)
        elif type(a) is int:
            if a == 1:
                key.append(1)
            elif _I32_LO <= a < _I32_HI:
                key.append(2 if a & 15 else 3)
            elif a < _U64:
                key.append(4 if a & 15 else 5)
            else:
                key.append(6 if a & 15 else 7)
        elif type(a) is float or type(a) is bool:
            key.append(type(a))
        else:
            key.append((a.dtype, a.data_ptr() & 15 == 0))
    return tuple(key)


def align_key(tensors):
    """16-byte alignment of each tensor's data pointer (None entries skipped): the per-call part of ``spec_key``
    when the integers are fixed by the caller's own key. True when all are aligned (the usual case)."""
    ptrs = [t.data_ptr() for t in tensors if t is not None]
    acc = 0
    for p in ptrs:
        acc |= p
    return True if acc & 15 == 0 else tuple(p & 15 == 0 for p in ptrs)


def _other_device(args, current):
    """The CUDA device index of the first tensor in ``args`` when it is not ``current`` (Triton's current device),
    else None (same device, or a CPU tensor as the interpreter and the host-only benchmark driver use)."""
    for a in args:
        if a is not None and type(a) not in (int, float, bool):
            idx = a.get_device()
            return idx if idx >= 0 and idx != current else None
    return None


def _on_device(idx):
    """Make CUDA device ``idx`` current for a ``with`` block (the rare launch on a non-current device)."""
    import torch

    return torch.cuda.device(idx)


def _hooks_active():
    """Whether a launch hook is installed, on entry or exit (a HookChain with calls on triton >= 3.8, a callable
    before): then launches go through ``JITFunction.run``, which builds the hooks' launch metadata."""
    rt = _RUNTIME
    if rt is None:
        return False
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    if type(enter) is _HOOK_CHAIN and type(leave) is _HOOK_CHAIN:
        return bool(enter.calls or leave.calls)
    return bool(getattr(enter, "calls", enter is not None) or getattr(leave, "calls", leave is not None))


_HOOK_CHAIN = getattr(getattr(triton, "knobs", None), "HookChain", None)
_DRIVER = triton.runtime.driver  # its ``active`` is the current driver (tests and benchmarks may swap it)
_RUNTIME = getattr(getattr(triton, "knobs", None), "runtime", None)  # launch hooks live here (triton >= 3.4)


class Plan:
    """One launch configuration of a ``@triton.jit`` function: its constexprs and options, and its compiled kernels
    per argument specialisation. ``launch(grid, args)`` takes the runtime arguments in parameter order; the
    constexprs follow them in the kernel's signature."""

    __slots__ = ("fn", "consts", "tail", "kernels", "direct", "paths", "meta", "n_ptr")

    def __init__(self, fn, consts, n_args, meta=None, n_ptr=None):
        self.fn = fn  # the JITFunction (or, under the interpreter, the InterpretedFunction)
        self.consts = dict(consts)  # constexprs and options (num_warps, num_stages, ...)
        names = fn.arg_names
        missing = [n for n in names[n_args:] if n not in self.consts]
        if missing:
            raise TypeError(f"{fn.__name__}: a plan needs values for {missing}")
        self.tail = tuple(self.consts[n] for n in names[n_args:])
        self.kernels = {}  # spec -> CompiledKernel
        self.direct = {}  # spec -> the driver-level launch of that kernel (``direct_launch``), or None
        self.paths = {}  # spec -> "direct" or why a kernel is launched through CompiledKernel.run
        self.meta = meta  # the launcher's own data (block sizes for the grid, ...)
        self.n_ptr = n_ptr  # with int_spec: the first n_ptr arguments are tensors or None, the rest fixed by the key

    def launch(self, grid, args, int_spec=None, spec=None):
        """Launch on ``grid``. ``int_spec``: ``spec_key`` of the arguments after the first ``n_ptr`` when the caller
        has it from its own key (then only the tensors' alignment is read here); ``spec``: the whole key, when the
        caller has computed it (``Call.launch``)."""
        if _SPECIAL:
            if _hot.traced():
                from ._traced import wrapped_launch

                wrapped_launch(self.fn, grid, args, self.consts)
            else:
                self.fn[grid](*args, **self.consts)
            return
        drv = _DRIVER.active
        device = drv.get_current_device()
        other = _other_device(args, device)
        if other is not None:  # the arguments live on another device: launch there, as a torch op would
            with _on_device(other):
                return self.launch(grid, args, int_spec, None)
        if spec is None:
            if int_spec is None:
                spec = (device, spec_key(args))
            else:
                ptrs = args[:self.n_ptr]
                spec = (device, int_spec, tuple(t.dtype for t in ptrs if t is not None), align_key(ptrs))
        kern = self.kernels.get(spec)
        if kern is None or _hooks_active():
            kern = self.fn.run(*args, grid=grid, warmup=False, **self.consts)
            if spec not in self.kernels and getattr(kern, "function", None) is not None \
                    and hasattr(kern, "packed_metadata"):
                direct, why = direct_launch(kern)
                self.direct[spec] = direct
                self.paths[spec] = why or "direct"
                self.kernels[spec] = kern  # (published last: a reader finding it finds its direct entry too)
            return
        stream = drv.get_current_stream(device)
        g0, g1, g2 = grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
        direct = self.direct[spec]
        if direct is not None:
            launch, function, coop, pdl, packed, annotations, signature = direct
            launch(g0, g1, g2, stream, function, coop, pdl, packed, None, None, None, None, None, annotations,
                   signature, (*args, *self.tail))
            return
        kern.run(g0, g1, g2, stream, kern.function, kern.packed_metadata, None, None, None, *args, *self.tail)


def _is_wrapper(fn):
    return isinstance(fn, (triton.runtime.Autotuner, triton.runtime.Heuristics))


class Call:
    """What a launcher's checks established for one call key: its launch plan, grid and integer arguments (the
    arguments after the tensors), and anything else the launcher keeps (``info``). ``launch(tensors)`` is the
    repeat path: the tensors' alignment, then the kernel of the last aligned launch on this device (``hot``), or
    one dictionary lookup, and the kernel's launch."""

    __slots__ = ("plan", "grid", "ints", "int_spec", "info", "tail", "ptr_pos", "dtypes", "hot")

    def __init__(self, plan=None, grid=None, ints=(), info=None):
        self.plan, self.ints, self.info = plan, ints, info
        self.grid = None if grid is None else (tuple(grid) + (1, 1))[:3]
        self.int_spec = spec_key(ints)
        self.tail = (*ints, *plan.tail) if plan is not None else ()
        self.ptr_pos = None  # positions of the tensors among the pointer arguments (fixed by the call key)
        self.dtypes = None  # their dtypes (fixed by the call key too; the plan's kernels are shared between keys)
        self.hot = None  # (device, driver, direct launch) of the all-aligned specialisation, once launched directly

    def launch(self, tensors):
        """Launch with the tensors (or None) that precede the integer arguments in the kernel's signature."""
        plan = self.plan
        if _SPECIAL:  # the interpreter, or a launch traced by torch.compile
            plan.launch(self.grid, (*tensors, *self.ints))
            return
        pos = self.ptr_pos
        if pos is None:
            self.dtypes = tuple(t.dtype for t in tensors if t is not None)
            pos = self.ptr_pos = tuple(i for i, t in enumerate(tensors) if t is not None)
        acc = 0
        for i in pos:
            acc |= tensors[i].data_ptr()
        drv = _DRIVER.active
        device = drv.get_current_device()
        other = tensors[pos[0]].get_device() if pos else -1
        if other != device and other >= 0:  # the tensors live on another device: launch there, as a torch op would
            with _on_device(other):
                return self.launch(tensors)
        hot = self.hot
        if hot is not None and acc & 15 == 0 and hot[0] == device and hot[1] is drv and not _hooks_active():
            # the repeat path: every pointer 16-byte aligned, as in the launch that set ``hot``
            launch, function, coop, pdl, packed, annotations, signature = hot[2]
            g = self.grid
            launch(g[0], g[1], g[2], drv.get_current_stream(device), function, coop, pdl, packed, None, None, None,
                   None, None, annotations, signature, (*tensors, *self.tail))
            return
        aligned = acc & 15 == 0
        spec = (device, self.int_spec, self.dtypes,
                True if aligned else tuple(tensors[i].data_ptr() & 15 == 0 for i in pos))
        kern = plan.kernels.get(spec)
        if kern is None or _hooks_active():
            plan.launch(self.grid, (*tensors, *self.ints), spec=spec)
            return
        direct = plan.direct.get(spec)
        g = self.grid
        stream = drv.get_current_stream(device)
        if direct is None:
            kern.run(g[0], g[1], g[2], stream, kern.function, kern.packed_metadata, None, None, None, *tensors,
                     *self.tail)
            return
        if aligned:
            self.hot = (device, drv, direct)
        launch, function, coop, pdl, packed, annotations, signature = direct
        launch(g[0], g[1], g[2], stream, function, coop, pdl, packed, None, None, None, None, None, annotations,
               signature, (*tensors, *self.tail))


_DIRECT_TRITON = ("3.8",)  # versions whose CudaLauncher.__call__ this module reproduces (see ``direct_launch``)
_LAUNCHER_FIELDS = ("launch", "arg_annotations", "kernel_signature", "global_scratch_size", "profile_scratch_size",
                    "launch_cooperative_grid", "launch_pdl")


def direct_launch(kern):
    """``(entry, None)`` where ``entry`` = (launch, function, cooperative, pdl, packed metadata, annotations,
    signature) lets a launch call the driver's launch function directly, as triton 3.8's ``CudaLauncher.__call__``
    does after allocating scratch memory (none here); ``(None, why)`` when the kernel must go through
    ``CompiledKernel.run``: another triton version or backend, a kernel that needs global or profile scratch memory,
    tensor descriptors, or a sanitizer. Same kernel, same arguments either way: only the Python in between differs."""
    version = ".".join(triton.__version__.split(".")[:2])
    if version not in _DIRECT_TRITON:
        return None, f"triton {triton.__version__}: its launcher is called as is (direct launch written for 3.8)"
    try:
        run = kern.run
    except Exception as exc:  # a kernel that cannot be loaded raises here and on its next launch alike
        return None, f"CompiledKernel.run: {type(exc).__name__}"
    if type(run).__name__ != "CudaLauncher":
        return None, f"{type(run).__name__}: not triton 3.8's CudaLauncher"
    missing = [f for f in _LAUNCHER_FIELDS if not hasattr(run, f)]
    if missing:
        return None, f"CudaLauncher without {missing}"
    if getattr(run, "gsan_enabled", False):
        return None, "the global sanitizer is enabled"
    if run.global_scratch_size or run.profile_scratch_size:
        return None, "the kernel needs scratch memory (allocated per launch by CudaLauncher)"
    if getattr(kern.metadata, "tensordesc_meta", None):
        return None, "the kernel takes tensor descriptors"
    return (run.launch, kern.function, run.launch_cooperative_grid, run.launch_pdl, kern.packed_metadata,
            run.arg_annotations, run.kernel_signature), None


def simple_plan(kernel, n_args, n_ptr, consts, cache, key):
    """The plan for constexprs ``consts`` (a dict incl. num_warps / num_stages) of an un-tuned kernel, kept in
    ``cache`` under ``key``."""
    plan = cache.get(key)
    if plan is None:
        plan = Plan(jit_function(kernel), consts, n_args, n_ptr=n_ptr)
        remember(cache, key, plan)
    return plan


_SIMPLE = {}


def run(kernel, grid, args, **consts):
    """``kernel[grid](*args, **consts)`` for an un-tuned kernel through a cached plan: the constexprs and options
    (``consts``) select the plan; the arguments' specialisation its compiled kernel."""
    key = (kernel, *consts.items())
    plan = _SIMPLE.get(key)
    if plan is None:
        plan = Plan(jit_function(kernel), consts, len(args))
        remember(_SIMPLE, key, plan)
    plan.launch(grid, args)


def tuned_plan(kernel, grid_of, make_args, kw, config_kw, n_ptr, cache, key):
    """The plan of an autotuned ``kernel`` for ``key`` in ``cache``: ``config_kw`` (explicit block sizes and
    options), or the autotuner's choice for the arguments ``make_args()`` gives (it runs once, through its own path,
    launching on them: give scratch outputs). ``grid_of(meta)`` gives the grid for a config; the heuristics' values
    are added."""
    plan = cache.get(key)
    if plan is None:
        args = make_args()
        chosen = config_kw if config_kw is not None else autotuned_config(kernel, grid_of, args, kw)
        fn = jit_function(kernel)
        consts = {**kw, **chosen}
        consts.update(heuristic_values(kernel, {**dict(zip(fn.arg_names, args)), **consts}))
        plan = Plan(fn, consts, len(args), meta=chosen, n_ptr=n_ptr)
        remember(cache, key, plan)
    return plan


def heuristic_values(fn, named):
    """The values the ``@triton.heuristics`` wrappers around ``fn`` would add, given the named arguments."""
    out = {}
    while _is_wrapper(fn):
        if isinstance(fn, triton.runtime.Heuristics):
            for name, heur in fn.values.items():
                out[name] = heur({**named, **out})
        fn = fn.fn
    return out


def jit_function(fn):
    """The ``@triton.jit`` function (or the interpreter's function) under autotune / heuristics wrappers."""
    while _is_wrapper(fn):
        fn = fn.fn
    return fn


def autotuned_config(tuner, grid, args, kwargs):
    """Launch ``tuner`` once through its own path (it benchmarks on a new key) and return the config it chose
    (``Config.all_kwargs()``: block sizes, num_warps, num_stages, ...). While launches are traced: the config by
    rule (``rule_config``), nothing launched."""
    if _hot.traced():
        from ._traced import rule_config

        return rule_config(tuner, jit_function(tuner).arg_names, args, kwargs)
    other = None if INTERPRETING else _other_device(args, _DRIVER.active.get_current_device())
    with _tune_lock:
        if other is None:
            tuner[grid](*args, **kwargs)
        else:  # compile and benchmark on the arguments' device
            with _on_device(other):
                tuner[grid](*args, **kwargs)
        config = tuner.best_config
    return dict(config.all_kwargs())
