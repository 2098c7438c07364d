"""fastvlm's vLLM plugin: vLLM's connector modules computed by fastvlm's fused projector op.

Installed by ``pip install "fastvlm[vllm]"`` as the ``vllm.general_plugins`` entry point ``fastvlm`` (pyproject.toml),
which vLLM calls in every process it starts (API server, engine core, each worker) before it builds a model.
``register()`` replaces the ``forward`` of the connector classes in ``fastvlm.integrations.vllm_connectors.FAMILIES``
(LLaVA's ``LlavaMultiModalProjector``, Qwen2-VL's and Qwen2.5-VL's patch mergers, Idefics3's connector, Gemma 3's
projector) with one that, per module:

* reads a plan on its first call (and again when a weight, bias or quant method is replaced, as vLLM does after
  loading): the fused op on this rank's shards followed by vLLM's all-reduce, or the reasons it stays vLLM's
  (quantized linears, repacked weights, LoRA wrappers, batch-invariant mode, ...);
* logs one line through vLLM's logger (``vllm.fastvlm``) the first time it decides, and again if the decision
  changes: ``fastvlm: multi_modal_projector (LlavaMultiModalProjector): linear_1 -> gelu -> linear_2 fused (...)``;
* runs vLLM's original forward for modules left alone, for inputs the fused path does not take, and while
  torch.compile traces the module (vLLM's ``compile_mm_encoder``, off by default).

``FASTVLM_VLLM=0`` (or ``off``/``false``/``no``) switches the plugin off: ``register()`` changes nothing.
``unregister()`` restores vLLM's forwards (tests use it). The plugin never imports vLLM before vLLM calls it.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

from fastvlm.integrations import vllm_connectors as C

ENV = "FASTVLM_VLLM"
logger = logging.getLogger("vllm.fastvlm")  # a child of vLLM's "vllm" logger: its handler and format
_ORIGINAL = "_fastvlm_vllm_original_forward"
_PLAN = "_fastvlm_vllm_plan"  # per module: (key, plan or None, reasons)


def enabled() -> bool:
    """False when FASTVLM_VLLM is 0/off/false/no."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def register() -> list:
    """vLLM's entry point: replace the supported connector classes' forwards (idempotent: vLLM may call it more than
    once per process). Returns the names of the classes patched by this call."""
    if not enabled():
        logger.info("fastvlm: vLLM plugin switched off (%s=%s)", ENV, os.environ.get(ENV))
        return []
    patched, missing = [], []
    for fam in C.FAMILIES:
        try:
            cls = getattr(importlib.import_module(fam.module), fam.cls)
        except (ImportError, AttributeError) as exc:  # an older or newer vLLM without this class
            missing.append(f"{fam.cls} ({type(exc).__name__}: {exc})")
            continue
        if _ORIGINAL in cls.__dict__:
            continue
        setattr(cls, _ORIGINAL, cls.forward)
        cls.forward = _fused_forward(fam, cls.forward)
        patched.append(fam.cls)
    if patched:
        logger.info("fastvlm: fused connector forward installed for %s (%s=0 switches it off)", ", ".join(patched),
                    ENV)
    for m in missing:
        logger.debug("fastvlm: connector class not found in this vLLM: %s", m)
    return patched


def unregister() -> list:
    """Restore vLLM's forwards; returns the names of the classes restored."""
    restored = []
    for fam in C.FAMILIES:
        try:
            cls = getattr(importlib.import_module(fam.module), fam.cls)
        except (ImportError, AttributeError):
            continue
        if _ORIGINAL in cls.__dict__:
            cls.forward = cls.__dict__[_ORIGINAL]
            delattr(cls, _ORIGINAL)
            restored.append(fam.cls)
    return restored


def decision(module):
    """(plan or None, reasons) for a connector module of a supported class, read now (tests and reports)."""
    fam = _family_of(type(module))
    if fam is None:
        return None, [f"{type(module).__name__} is not a connector class the plugin knows"]
    return C.read_plan(module, fam)


def _family_of(cls):
    for klass in cls.__mro__:
        for fam in C.FAMILIES:
            if klass.__name__ == fam.cls and klass.__module__ == fam.module:
                return fam
    return None


def _name(module, fam):
    """The module's place in the model, from its first linear's vLLM prefix (``multi_modal_projector.linear_1``)."""
    prefix = getattr(module.get_submodule(fam.linear_1), "prefix", "") or ""
    suffix = "." + fam.linear_1
    where = prefix[: -len(suffix)] if prefix.endswith(suffix) else prefix
    return f"{where} ({fam.cls})" if where else fam.cls


def _current_plan(module, fam):
    """The module's plan, re-read when one of the objects it was read from was replaced; logs each new decision."""
    key = C._key(module, fam)
    cached = module.__dict__.get(_PLAN)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan, reasons = C.read_plan(module, fam)
    line = plan.description if plan is not None else "left to vLLM: " + "; ".join(reasons)
    if cached is None or cached[2] != line:
        logger.info("fastvlm: %s: %s", _name(module, fam), line)
    module.__dict__[_PLAN] = (key, plan, line)
    return plan


def _fused_forward(fam, original):
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            # vLLM compiles a connector only with compile_mm_encoder (off by default; Qwen2.5-VL's merger): the
            # plan's bookkeeping (ids, logging) is not traceable, so the traced forward stays vLLM's
            return original(self, *args, **kwargs)
        if len(args) == 1 and not kwargs:
            x = args[0]
        elif not args and len(kwargs) == 1 and fam.input_name in kwargs:
            x = kwargs[fam.input_name]
        else:  # a call the original signature may reject: its own error
            return original(self, *args, **kwargs)
        plan = _current_plan(self, fam)
        if plan is None or C.defer_reason(plan, x) is not None:
            return original(self, *args, **kwargs)
        return C.run(plan, x)

    forward._fastvlm_family = fam.name
    return forward
