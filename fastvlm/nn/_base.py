"""What every ``Fused<Original>`` class shares: the base class with ``from_module``, adopting an original module's
children and tensors without copying, and handing input the fused path does not take back to the original forward."""
from __future__ import annotations

import torch.nn as nn

from fastvlm import _dispatch
from fastvlm.nn import _plan


def _child_reasons(name, mod):
    reasons = []
    if mod._forward_hooks or mod._forward_pre_hooks:
        reasons.append(f"{name} has forward hooks, which the fused path would not call")
    return reasons


class _FusedBase:
    """What every ``Fused<Original>`` class shares: the original class (``_fastvlm_base``) and ``from_module``."""

    _fastvlm_base: type

    def __getstate__(self):  # pickle / deepcopy: plans (live references) are rebuilt on demand
        return _plan.state_without_plan(super().__getstate__())

    @classmethod
    def from_module(cls, original):
        """Wrap ``original`` (an instance of the original class) without copying: same children, same tensors."""
        if not isinstance(original, cls._fastvlm_base):
            raise TypeError(f"{cls.__name__}.from_module expects a {cls._fastvlm_base.__name__}, got "
                            f"{type(original).__name__}")
        return _adopt(cls, original)


class _DeferToOriginal(Exception):
    """Input the original module decides on (it raises its own error, or computes something the fused path does
    not): the original forward runs unchanged."""


def _run_original(module, why, *args, quiet=False):
    """The original forward on input the fused path does not take: its error comes out as it is; if it returns a
    result instead, the fallback is reported (never silent; ``quiet``: recorded in fastvlm.trace() only, for input
    without data, where no speed is lost) and that result returned."""
    out = module._fastvlm_base.forward(module, *args)
    _dispatch.report_fallback(module._fastvlm_recipe.fused_name, [why], f"x{tuple(args[0].shape)}", explicit=quiet)
    return out


# instance attributes that accelerate's device hooks put on a module: never copied (they are bound to the
# original); the hook itself is re-attached to the fused module instead
_ACCELERATE_ATTRS = ("forward", "_old_forward", "_hf_hook")


def _adopt(cls, original):
    """A ``cls`` instance sharing ``original``'s children, parameters, buffers and plain attributes (hooks excluded)."""
    fused = cls.__new__(cls)
    nn.Module.__init__(fused)
    module_state = set(fused.__dict__)
    for key, value in original.__dict__.items():
        if key not in module_state and key not in _ACCELERATE_ATTRS and not key.startswith(_plan.PLAN_ATTR):
            fused.__dict__[key] = value
    fused._parameters = dict(original._parameters)
    fused._buffers = dict(original._buffers)
    fused._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
    fused._modules = dict(original._modules)
    fused.training = original.training
    hook = original.__dict__.get("_hf_hook")
    if hook is not None:  # a device_map placement (accelerate): the fused module gets the same hook
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(fused, hook)
    return fused

