"""Launches traced by torch.compile (``_launch.traced()``, a ``triton_op``'s body on fake or functional tensors):
the kernel call through ``wrap_triton``, so the graph holds it and Inductor launches it, and the config an autotuned
kernel takes there (by rule: nothing can be timed on fake tensors). docs/design-launch.md, "torch.compile"."""
from __future__ import annotations


def wrapped_launch(fn, grid, args, consts):
    """The traced launch: ``fn`` (a JITFunction) through ``wrap_triton``, constexprs and options as keywords."""
    from torch.library import wrap_triton

    kw = {}
    for name, value in consts.items():  # Config.all_kwargs() adds launch options at their defaults (num_ctas=1...)
        if name in _TRACED_OPTIONS or name in fn.arg_names:
            kw[name] = value
        elif value is not None and not (name == "num_ctas" and value == 1):
            raise NotImplementedError(f"{fn.__name__}: the launch option {name}={value!r} cannot be traced")
    wrap_triton(fn)[tuple(grid)](*args, **kw)


_TRACED_OPTIONS = ("num_warps", "num_stages")  # what wrap_triton takes beside the kernel's own arguments


def rule_config(tuner, arg_names, args, kwargs):
    """The config a traced launch of autotuned ``tuner`` (its kernel's parameters ``arg_names``) takes: the first
    that its own pruning keeps for these arguments (the order of the configs is the kernel's preference), as
    ``Config.all_kwargs()``."""
    configs = tuner.configs
    prune = getattr(tuner, "early_config_prune", None)
    if prune:
        named = dict(zip(arg_names, args))
        configs = prune(configs, named, **kwargs) or configs
    return dict(configs[0].all_kwargs())
