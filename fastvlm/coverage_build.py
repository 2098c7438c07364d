"""``fastvlm coverage --build``: one family's model built from its default configuration on the meta device, its
modules recognised as ``fastvlm.patch`` recognises them.

Recipe classes are listed by path. Each module recognition by structure would consider (``structure.plausible`` on
types and shapes) is copied to the CPU with random weights, then recognised and confirmed on its probes exactly as at
patch time: the same code decides. Modules inside a module already matched are skipped, as ``patch`` skips them.
"""
from __future__ import annotations

import copy
import warnings

import torch

from fastvlm.coverage import Coverage, _classify, _default_config
from fastvlm.coverage_notes import NOTES

_MAX_PARAMS = 3e8  # a candidate larger than this is not materialised (reported as not confirmed)


def _materialise(mod):
    """A CPU copy of a meta-device module with random weights; None when a buffer cannot be rebuilt."""
    real = copy.deepcopy(mod).to_empty(device="cpu")
    with torch.no_grad():
        for p in real.parameters():
            p.normal_(0, 0.05)
        for b in real.buffers():
            if b.dtype in (torch.int64, torch.int32) and b.dim() >= 1:  # position ids: 0 .. n-1
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
            else:
                return None
    return real


def built(model_type, model_class):
    import transformers

    from fastvlm.integrations import structure
    from fastvlm.integrations.transformers import LINEAR_SLOTS
    from fastvlm.nn import recipe_for
    from fastvlm.nn.glm import merge_conv_paths

    cov = Coverage(model_type, model_class)
    kind, text = NOTES.get(model_type, (None, ""))
    try:
        cfg = _default_config(model_type)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = getattr(transformers, model_class)(cfg)
    except Exception as exc:
        cov.not_fused = f"not built from its default configuration ({type(exc).__name__}: {str(exc)[:120]})"
        if kind in ("unsupported", "nothing", "partly"):
            cov.not_fused = text + "; " + cov.not_fused
        cov.status = "nothing to fuse" if kind == "nothing" else "unavailable"
        return cov
    eligible = structure.eligible_paths(model)
    merge_convs = set(merge_conv_paths(model))
    owners = {name: type(m).__name__ for name, m in model.named_modules()}
    done = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, mod in model.named_modules():
            if any(name.startswith(d + ".") for d in done):
                continue
            parent, _, attr = name.rpartition(".")
            if recipe_for(mod) is not None:
                cov.fused.append(f"{name}: {type(mod).__name__} (recipe)")
                done.append(name)
            elif type(mod) is torch.nn.Linear and (owners.get(parent), attr) in LINEAR_SLOTS:
                cov.fused.append(f"{name}: Linear (recipe)")
            elif name in merge_convs:
                cov.fused.append(f"{name}: Conv2d (merge conv: kernel == stride == spatial_merge_size)")
            elif name in eligible and structure.plausible(mod):
                if sum(p.numel() for p in mod.parameters()) > _MAX_PARAMS:
                    continue
                real = _materialise(mod)
                match = structure.recognise(real) if real is not None else None
                if match is not None and match.ok:
                    cov.fused.append(f"{name}: {type(mod).__name__} (structure: {match.what})")
                    done.append(name)
    if kind == "structure":
        kind = None  # the build itself says what structure matched
    elif kind == "partly":  # the build says what is fused; the note what is not
        kind, cov.not_fused = None, text.partition(" | ")[2]
    return _classify(cov, kind, text)
