"""Per-module plans: what a fused forward decides from the module's structure, decided once and re-checked cheaply.

A fused module's forward first reads its structure: which children it has (the Linears, the norm, the
activation), their types and settings (eps, GELU's approximation), which parameters they hold. That does not change
between calls, so it is decided once and kept with a ``Fingerprint`` of what it was read from:

* every link followed (``module._modules[name]``, ``module._parameters[name]``) and the object found there: a child
  or parameter replaced (``lin.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``, a LoRA wrapper put in
  a child's place, ``module._parameters[...] = ...``) is seen by identity;
* the plain attributes read (eps, the merged width, ...) and each module's ``training`` flag: compared by value.

A plan holds the parameter objects themselves, never their data, copies or views: ``.half()``, ``.to(device)``,
``load_state_dict`` and in-place updates change what the parameter holds, and the next call reads the new data.
Views (a transposed weight) are taken per call. Anything derived from values belongs in a versioned cache instead.

Checking a fingerprint costs a dictionary lookup and an identity test per link. Plans are published whole in the
module's ``__dict__`` (one assignment), so concurrent calls see an old plan or a new one, never half of one; a lost
race builds twice. ``fastvlm_clear_plan(module)`` drops it by hand; pickling and deepcopy leave it out.
"""
from __future__ import annotations

import torch

PLAN_ATTR = "_fastvlm_module_plan"
_MISSING = object()


class Fingerprint:
    """The links, attributes and flags a plan was read from (see the module docstring)."""

    __slots__ = ("links", "attrs")

    def __init__(self):
        self.links = []  # (owner, "_modules" | "_parameters" | "_buffers", name, object found)
        self.attrs = []  # (object, attribute name, value found, default when missing)

    # ---- reading the structure through the fingerprint

    def child(self, module, path, optional=False):
        """``module.get_submodule(path)`` (None for a missing last child when ``optional``), recording each link."""
        if not path:
            return module
        mod = module
        parts = path.split(".")
        for i, name in enumerate(parts):
            found = mod.__dict__["_modules"].get(name, _MISSING) if "_modules" in mod.__dict__ else _MISSING
            if found is _MISSING:
                if optional and i == len(parts) - 1:
                    return self.attr(mod, name, None)  # a plain attribute holding None (LFM2-VL's layer_norm)
                return module.get_submodule(path)  # raises the AttributeError transformers users know
            self.links.append((mod, "_modules", name, found))
            mod = found
            if mod is None:
                return None
        return mod

    def param(self, module, name):
        """``getattr(module, name)`` for a parameter or buffer (or None), recording the link."""
        for kind in ("_parameters", "_buffers"):
            table = module.__dict__.get(kind)
            if table is not None and name in table:
                found = table[name]
                self.links.append((module, kind, name, found))
                return found
        return self.attr(module, name)

    def subtree(self, module, prefix=""):
        """Record every child, parameter and buffer link below ``module`` and each module's ``training`` flag, for
        plans read with plain attribute access; returns the (name, module) pairs of the subtree (for the per-call
        hook checks)."""
        out = []
        stack = [(prefix, module)]
        seen = set()
        while stack:
            name, mod = stack.pop()
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            out.append((name, mod))
            self.attrs.append((mod, "training", mod.training, _MISSING))
            for kind in ("_parameters", "_buffers"):
                for key, value in mod.__dict__[kind].items():
                    self.links.append((mod, kind, key, value))
            for key, child in mod.__dict__["_modules"].items():
                self.links.append((mod, "_modules", key, child))
                if child is not None:
                    stack.append((f"{name}.{key}" if name else key, child))
        return tuple(out)

    def attr(self, obj, name, default=_MISSING):
        """A plain attribute, recorded by value."""
        value = getattr(obj, name) if default is _MISSING else getattr(obj, name, default)
        self.attrs.append((obj, name, value, default))
        return value

    # ---- checking it

    def valid(self):
        for owner, kind, name, obj in self.links:
            if owner.__dict__[kind].get(name, _MISSING) is not obj:
                return False
        for obj, name, value, default in self.attrs:
            current = getattr(obj, name, default)
            if current is not value and current != value:
                return False
        return True


def cached_plan(module, build, attr=PLAN_ATTR):
    """The module's plan, rebuilt by ``build(fingerprint)`` when anything it was read from changed (or the
    module's training flag). ``build`` returns the plan (any object); it reads the module through the fingerprint.
    ``attr``: the name it is kept under in ``module.__dict__`` (a module keeping plans of several parts)."""
    if torch.compiler.is_compiling():  # traced once per graph (guards cover the module): nothing kept
        return build(Fingerprint())
    held = module.__dict__.get(attr)
    training = module.training
    if held is not None and held[0] == training and held[1].valid():
        return held[2]
    fp = Fingerprint()
    plan = build(fp)
    module.__dict__[attr] = (training, fp, plan)
    return plan


def hooked(named_modules, prefix=""):
    """Reasons for the modules among ``named_modules`` (name, module) that carry forward hooks."""
    return [f"{prefix}{name} has forward hooks, which the fused path would not call" for name, m in named_modules
            if name and (m._forward_hooks or m._forward_pre_hooks)]


def fastvlm_clear_plan(module):
    """Forget ``module``'s plans (the next call reads its structure again)."""
    for key in [k for k in module.__dict__ if k.startswith(PLAN_ATTR)]:
        del module.__dict__[key]


def state_without_plan(state):
    """A module's ``__getstate__`` result minus its plans (they refer to live objects: rebuilt after a copy)."""
    for key in [k for k in state if k.startswith(PLAN_ATTR)]:
        del state[key]
    return state
