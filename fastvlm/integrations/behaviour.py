"""What a module class is, by behaviour and by code rather than by name (used by recognition by structure).

* ``norm_kind(m)``: an RMSNorm-like class is compared with the kernel's RMSNorm (``w * norm(x)`` and Gemma's
  ``norm(x) * (1 + w)``) in fp32 and, bit for bit, in bf16, so that its cast points are the kernel's; a confirmed class
  is registered in ``fastvlm.nn.projector.NORMS_BY_BEHAVIOUR`` (the projector's norm plan reads it).
* ``act_kind(m)``: an activation class without a name fastvlm knows is compared with each fused activation in fp32
  and registered in ``fastvlm.reference.activations.BY_BEHAVIOUR``.
* ``code_shape(cls)``: the class's methods but ``__init__`` (what it computes, not how its sizes are spelled), class
  names and docstrings anonymised; ``copy_of(cls)`` the recipe whose class has the same code (a copy transformers'
  modular converter made for another family), if any. The children a copy builds are checked where it is used:
  their types by the recipe's structure check, the whole on probes.
"""
from __future__ import annotations

import ast
import copy
import functools
import importlib
import inspect
import textwrap

import torch
import torch.nn as nn

from fastvlm.nn.projector import NORMS_BY_BEHAVIOUR, _norm_plan
from fastvlm.reference.activations import ACTIVATIONS, BY_BEHAVIOUR, act_ref, activation_name


def _rms_ref(x, w, eps, one_plus):
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if one_plus:
        return (n * (1.0 + w.float())).to(x.dtype)
    return w * n.to(x.dtype)


def _eps_attr(m):
    for a in ("variance_epsilon", "eps", "epsilon"):
        if isinstance(getattr(m, a, None), float):
            return a
    return None


def norm_kind(m):
    """'layernorm', 'rmsnorm' or 'rmsnorm_1p' when the fused kernels compute exactly what ``m`` does, else None."""
    if not isinstance(_norm_plan(m), str):
        return _norm_plan(m)[0]
    if type(m) in NORMS_BY_BEHAVIOUR:
        return NORMS_BY_BEHAVIOUR[type(m)][0]
    w, eps = getattr(m, "weight", None), _eps_attr(m)
    if (not isinstance(w, nn.Parameter) or w.dim() != 1 or eps is None or w.device.type == "meta"
            or set(dict(m.named_parameters())) != {"weight"} or list(m.children())):
        return None
    for kind in ("rmsnorm", "rmsnorm_1p"):
        if _behaves_as_rms(m, eps, kind == "rmsnorm_1p"):
            NORMS_BY_BEHAVIOUR[type(m)] = (kind, eps)
            return kind
    return None


def _behaves_as_rms(m, eps_attr, one_plus):
    g = torch.Generator().manual_seed(0)
    try:
        probe = copy.deepcopy(m).cpu()
        eps = float(getattr(probe, eps_attr))
        with torch.no_grad():
            probe.weight.copy_(1 + 0.3 * torch.randn(probe.weight.shape, generator=g))
            for dt in (torch.float32, torch.bfloat16):
                probe.to(dt)
                x = (torch.randn(3, 5, probe.weight.shape[0], generator=g) * 3).to(dt)
                got, ref = probe(x), _rms_ref(x, probe.weight, eps, one_plus)
                if got.dtype != ref.dtype or got.shape != ref.shape:
                    return False
                if dt == torch.bfloat16 and not torch.equal(got, ref):
                    return False  # other cast points than the kernel's
                if dt == torch.float32 and not torch.allclose(got, ref, rtol=1e-5, atol=1e-6):
                    return False
    except Exception:
        return False
    return True


def act_kind(m):
    """The fused activation computing what ``m`` does (by class, else by behaviour on a probe), or None."""
    name = activation_name(m)
    if name is not None or list(m.parameters()) or list(m.children()):
        return name
    x = torch.linspace(-8, 8, 1001)
    try:
        with torch.no_grad():
            got = m(x.clone())
    except Exception:
        return None
    for cand in ACTIVATIONS:
        if cand != "none" and isinstance(got, torch.Tensor) and got.shape == x.shape and torch.allclose(
                got, act_ref(x, cand), rtol=1e-5, atol=1e-6):
            BY_BEHAVIOUR[type(m)] = cand
            return cand
    return None


# --------------------------------------------------------------------------------------------------- copies

class _Anonymise(ast.NodeTransformer):
    """Class names (CamelCase) and docstrings out: what is left is the code's structure."""

    def visit_Name(self, node):
        if node.id[:1].isupper() and any(ch.islower() for ch in node.id):
            node.id = "C"
        return node

    def _strip(self, node):
        self.generic_visit(node)
        body = node.body
        if (body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
        return node

    def visit_ClassDef(self, node):
        node.name = "C"
        node.body = [b for b in node.body if not (isinstance(b, ast.FunctionDef) and b.name == "__init__")]
        return self._strip(node)

    visit_FunctionDef = visit_AsyncFunctionDef = _strip


@functools.lru_cache(maxsize=256)
def _class_nodes(module_name):
    """{class name: ast.ClassDef} of a module's top-level classes, its file parsed once."""
    import sys

    try:
        tree = ast.parse(inspect.getsource(sys.modules[module_name]))
    except (OSError, TypeError, SyntaxError, KeyError):
        return {}
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _methods(cls):
    return frozenset(k for k, v in vars(cls).items() if inspect.isfunction(v) and k != "__init__")


@functools.lru_cache(maxsize=None)
def code_shape(cls):
    """The class's code with class names and docstrings anonymised (None when its source cannot be read)."""
    node = _class_nodes(cls.__module__).get(cls.__qualname__)
    if node is None:
        try:
            node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
        except (OSError, TypeError, SyntaxError, IndentationError, IndexError):
            return None
    return ast.dump(_Anonymise().visit(copy.deepcopy(node)), annotate_fields=False)


@functools.lru_cache(maxsize=1)
def recipe_shapes():
    """{code shape: (recipe, factory)} of every recipe class that can be imported (the first recipe per shape)."""
    from fastvlm.nn import all_recipes
    from fastvlm.nn.feature_map import fused_feature_map_class

    shapes, methods = {}, set()
    for r, factory in all_recipes():
        if factory is fused_feature_map_class:  # reads its tower's map in place: not a recipe for another class
            continue
        try:
            cls = getattr(importlib.import_module(r.module), r.cls)
        except (ImportError, AttributeError):
            continue
        shape = code_shape(cls)
        if shape is not None:
            shapes.setdefault(shape, (r, factory))
            methods.add(_methods(cls))
    return shapes, frozenset(methods)


def copy_of(cls):
    """(recipe, factory) of the recipe class whose code ``cls`` repeats under other names, or None."""
    shapes, methods = recipe_shapes()
    if _methods(cls) not in methods:  # a different set of methods: not a copy (no source read)
        return None
    shape = code_shape(cls)
    return shapes.get(shape) if shape is not None else None
