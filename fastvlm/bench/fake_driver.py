"""A host-only Triton driver: the whole Python launch path of a Triton kernel, on a machine without a GPU.

At batch 1 a connector's kernels run for microseconds, so the Python work before each launch (plan lookup,
autotuner, heuristics, argument binding, the launcher) is the latency a user sees. That work does not need a GPU,
and this driver lets it run on CPU tensors: Triton believes an sm_90 device is present, compiles every kernel for
sm_90 (ptxas runs, as on an H100), loads nothing, and replaces only the final C call (``cuLaunchKernelEx``) by a
Python function that reads each kernel argument the way the C launcher does (a tensor's ``data_ptr``, an int's
value). Nothing is computed: outputs are whatever ``torch.empty`` returned. Time calls with it, never check values.

    from fastvlm.bench import fake_driver
    drv = fake_driver.install()      # before the first launch, in a process without TRITON_INTERPRET=1
    fused(x)                         # compiles for sm_90 (seconds)
    n = drv.launches; fused(x); drv.launches - n   # launches per call

``install`` also makes fastvlm's dispatch pick the Triton path for CPU tensors. ``uninstall`` restores Triton's
driver and the dispatch. Used by ``fastvlm bench --overhead`` and by tests that check the launch path on a CPU (a
launch count, no host synchronisation); never imported by the library itself.

Written for triton 3.8 (``triton.backends.nvidia.driver.CudaLauncher`` calling ``utils.launch`` with argument
annotations); on another version ``install`` raises with the reason instead of guessing.
"""
from __future__ import annotations

import itertools

import torch

# an H100 SXM's properties as Triton reads them (shared memory per block, SMs, registers)
H100_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                   "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

_KERNEL_ARG = "kernel"  # annotation kinds given to the launcher (our own tokens, not the C enum)
_CONSTEXPR = "constexpr"
_TUPLE = "tuple"


class _Annotation:
    __slots__ = ("kind", "nested")

    def __init__(self, nested_tuple=None, type=None):  # noqa: A002 - Triton calls it with these keywords
        self.kind = type
        self.nested = nested_tuple


class _HostUtils:
    """What Triton asks ``driver.active.utils`` for: properties, module loading, and the launch itself."""

    def __init__(self):
        self.launches = 0
        self.last_grid = None
        self.last_args = 0
        self.record = None  # a list to append each launch's arguments to (tests compare launch paths with it)
        self._handles = itertools.count(1)
        self._positions = {}  # id(annotations) -> (annotations, positions of kernel arguments)

    def get_device_properties(self, device):
        return dict(H100_PROPERTIES)

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, max threads per block)
        return next(self._handles), next(self._handles), 128, 0, 1024

    def unload_module(self, module):
        pass

    def build_signature_metadata(self, signature):
        return tuple(signature)

    def launch(self, grid_x, grid_y, grid_z, stream, function, cooperative, pdl, kernel_metadata, launch_metadata,
               enter_hook, exit_hook, global_scratch, profile_scratch, annotations, signature, args):
        if enter_hook is not None:
            enter_hook(launch_metadata)
        if self.record is not None:
            self.record.append((grid_x, grid_y, grid_z, stream, function, cooperative, pdl, kernel_metadata,
                                global_scratch, profile_scratch, annotations, signature, args))
        # the C launcher converts each kernel argument in C: a pointer argument costs a data_ptr() call, an int
        # nothing measurable, so only pointers are touched here (their positions are found once per launcher)
        entry = self._positions.get(id(annotations))
        if entry is None or entry[0] is not annotations:
            entry = self._positions[id(annotations)] = (annotations, _kernel_arg_positions(annotations, signature))
        positions = entry[1]
        if positions is None:
            n = _read_args(annotations, args)
        else:
            n, pointers = positions
            for i in pointers:
                args[i].data_ptr()
        self.launches += 1
        self.last_grid = (grid_x, grid_y, grid_z)
        self.last_args = n
        if exit_hook is not None:
            exit_hook(launch_metadata)


def _kernel_arg_positions(annotations, signature):
    """(number of kernel arguments, positions of the pointer arguments among ``args``); None when an argument is a
    tuple (then ``_read_args`` walks them)."""
    if any(ann.kind is _TUPLE for ann in annotations):
        return None
    kernel = [i for i, ann in enumerate(annotations) if ann.kind is _KERNEL_ARG]
    pointers = tuple(i for i, ty in zip(kernel, signature) if str(ty).startswith("*"))
    return len(kernel), pointers


def _read_args(annotations, args):
    """Read every kernel argument as the C launcher does; constexprs are skipped, tuples flattened. Returns how
    many arguments the kernel receives."""
    n = 0
    for ann, value in zip(annotations, args):
        if ann.kind is _KERNEL_ARG:
            n += 1
            if isinstance(value, torch.Tensor):
                value.data_ptr()
        elif ann.kind is _TUPLE:
            n += _read_args(ann.nested, value)
    return n


class _Benchmarker:
    """The autotuner's timer: each config is compiled and launched once (a config that does not fit the device
    raises here and the autotuner drops it, as on a GPU), and timed by the order it was offered in, so the first
    config that fits wins, deterministically. With ``run_configs=False`` nothing is compiled here (the first config
    wins; tests that use configs known to fit save the compile time)."""

    def __init__(self, run_configs=True):
        self._n = itertools.count()
        self.run_configs = run_configs

    def __call__(self, fn, quantiles=None, **kwargs):
        if self.run_configs:
            fn()
        t = float(next(self._n))
        return [t, t, t] if quantiles else t


class HostOnlyDriver:
    """``triton.runtime.driver.active`` for a pretend sm_90 device whose tensors live on the CPU."""

    def __init__(self, run_configs=True):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import CudaLauncher

        self.utils = _HostUtils()
        self.launcher_cls = CudaLauncher
        self._target = GPUTarget("cuda", 90, 32)
        self._bench = _Benchmarker(run_configs)

    @property
    def launches(self):
        return self.utils.launches

    @staticmethod
    def is_active():
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self._target

    def get_device_capability(self, device=0):
        return (9, 0)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        return self._bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0)

    def clear_cache(self, cache):
        pass

    def allocate_default_profile_scratch(self, size, alignment, stream):
        return None


_saved = {}


def _check_version():
    import triton
    import triton.backends.nvidia.driver as nv

    needed = ("CudaLauncher", "annotate_arguments", "make_kernel_signature")
    missing = [n for n in needed if not hasattr(nv, n)]
    if missing or not hasattr(nv, "ARG_KERNEL"):
        raise RuntimeError(f"fastvlm.bench.fake_driver supports triton 3.8's launcher; triton {triton.__version__} "
                           f"lacks {missing or ['ARG_KERNEL']} in triton.backends.nvidia.driver")


def install(run_configs=True) -> HostOnlyDriver:
    """Make Triton launch on a pretend sm_90 device (see the module docstring). Returns the driver (its
    ``launches`` counts the launches). ``run_configs=False``: the autotuner takes the first config without
    compiling the others (see ``_Benchmarker``)."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("fake_driver needs a process without TRITON_INTERPRET=1 (it compiles for sm_90)")
    _check_version()
    import triton
    import triton.backends.nvidia.driver as nv

    from fastvlm import _dispatch

    if _saved:
        return triton.runtime.driver.active
    _saved["nv"] = (nv.PyKernelArg, nv.ARG_CONSTEXPR, nv.ARG_KERNEL, nv.ARG_TUPLE)
    _saved["environment_reasons"] = _dispatch.environment_reasons
    nv.PyKernelArg, nv.ARG_CONSTEXPR, nv.ARG_KERNEL, nv.ARG_TUPLE = _Annotation, _CONSTEXPR, _KERNEL_ARG, _TUPLE
    drv = HostOnlyDriver(run_configs)
    triton.runtime.driver.set_active(drv)
    _dispatch.environment_reasons = _host_environment_reasons(_dispatch.triton_status)
    return drv


def _host_environment_reasons(status):
    """fastvlm's environment check with every device taking the Triton path (when triton imports)."""
    def reasons(device):
        ok, why = status()
        return [] if ok else [why]
    return reasons


def uninstall() -> None:
    """Restore Triton's own driver and fastvlm's dispatch."""
    if not _saved:
        return
    import triton
    import triton.backends.nvidia.driver as nv

    from fastvlm import _dispatch

    nv.PyKernelArg, nv.ARG_CONSTEXPR, nv.ARG_KERNEL, nv.ARG_TUPLE = _saved.pop("nv")
    _dispatch.environment_reasons = _saved.pop("environment_reasons")
    triton.runtime.driver.reset_active()
