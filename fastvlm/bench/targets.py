"""The performance targets of the issues, as rows of the benchmark suites, and their evaluation.

Each target names the row of fastvlm and the row it is compared with (suite, shape, mode, provider, dtype), or a
roofline measure of one row, and the threshold the issue set. ``evaluate(rows)`` finds the newest matching rows (rows
come from several steps and files: ratios are computed here, never inside one suite's run) and returns, per target,
the measured value and whether it is met. Pure Python, no torch: the GPU session runs it after every step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

FAST = "fastvlm"


@dataclass(frozen=True)
class Target:
    issue: int
    what: str
    suite: str
    shape: str  # a regular expression matched against the row's shape (tiny dry-run rows keep the names)
    baseline: str | None  # the provider compared with; None: ``measure`` of the fastvlm row itself
    threshold: float | None  # None: reported, no target
    mode: str = "fwd"
    dtype: str | None = None  # "bfloat16" / "float32"; None: any
    measure: str = "speedup"  # "speedup" (baseline ms / fastvlm ms), "tflops" (fraction of the bf16 ceiling),
    #                           "bandwidth" (min_bytes / ms over the copy ceiling), "roofline" (roofline_fraction)
    provider: str = FAST


TARGETS = [
    Target(2, "LLaVA-1.5 projector, B=8 (4608 tokens) vs eager", "projector", r"llava-1\.5-7b@8$", "hf_eager", 1.15),
    Target(2, "LLaVA-1.5 projector, B=8 vs torch.compile max-autotune", "projector", r"llava-1\.5-7b@8$",
           "hf_compile_max_autotune", 1.0),
    Target(2, "LLaVA-1.5 projector, B=8: fraction of the bf16 ceiling", "projector", r"llava-1\.5-7b@8$", None,
           0.65, measure="tflops"),
    Target(2, "LLaVA-1.5 projector, B=1 (576 tokens) vs eager", "projector", r"llava-1\.5-7b@1$", "hf_eager", 1.15),
    Target(2, "LLaVA-1.5 projector, B=64: fraction of the bf16 ceiling", "projector", r"llava-1\.5-7b@64$", None,
           0.65, measure="tflops"),
    Target(5, "Gemma 3 projector, B=64 vs eager", "projector", r"gemma3-4b@64$", "hf_eager", 2.0),
    Target(5, "Gemma 3 projector, B=64: fraction of the copy bandwidth", "projector", r"gemma3-4b@64$", None, 0.70,
           measure="bandwidth"),
    Target(3, "CLIP-L/14-336 embeddings + pre-LN, B=8 vs eager", "patch_embed", r"clip-l-336@8$", "eager", 3.0),
    Target(3, "CLIP-L/14-336 embeddings + pre-LN, B=8 vs the GEMM formulation", "patch_embed", r"clip-l-336@8$",
           "gemm", 1.5),
    Target(3, "CLIP-L/14-336 embeddings + pre-LN, B=8 vs torch.compile max-autotune", "patch_embed",
           r"clip-l-336@8$", "compile", None),
    Target(3, "CLIP-L/14-336 embeddings + pre-LN, B=64: fraction of the roofline (within 2x)", "patch_embed",
           r"clip-l-336@64$", None, 0.5, measure="roofline"),
    Target(4, "whole Q-Former, B=8 fp32 vs transformers sdpa", "qformer", r"^blip2-qformer.*@8 ", "hf_sdpa", 2.5,
           dtype="float32"),
    Target(4, "whole Q-Former, B=8 fp32 vs torch.compile max-autotune", "qformer", r"^blip2-qformer.*@8 ",
           "hf_compile_max_autotune", 1.5, dtype="float32"),
    Target(4, "whole Q-Former, B=8 fp32 vs transformers eager", "qformer", r"^blip2-qformer.*@8 ", "hf_eager", None,
           dtype="float32"),
    Target(4, "whole Q-Former, B=8 bf16 vs transformers sdpa", "qformer", r"^blip2-qformer.*@8 ", "hf_sdpa", 2.5,
           dtype="bfloat16"),
    Target(4, "whole Q-Former, B=8 fp32 module, bf16 compute vs sdpa", "qformer", r"^blip2-qformer.*@8 ", "hf_sdpa",
           None, dtype="float32", provider="fastvlm_bf16"),
    Target(4, "attention core 32x257, B=8 bf16 vs SDPA", "attention", r"^attn .*@8 ", "sdpa", 1.0,
           dtype="bfloat16"),
    Target(4, "attention core 32x257, B=8 bf16 vs flash-attn", "attention", r"^attn .*@8 ", "flash_attn", 1.0,
           dtype="bfloat16"),
    Target(5, "Idefics2 connector (perceiver), 729 x B=8 vs transformers sdpa", "perceiver", r"idefics2-8b@729x8$",
           "hf_sdpa", 1.5),
    Target(5, "Idefics2 connector (perceiver), 729 x B=8 vs transformers eager", "perceiver", r"idefics2-8b@729x8$",
           "hf_eager", None),
    Target(5, "InternVL3 pixel shuffle + projector, 7 tiles vs eager", "projector", r"internvl-shuffle@7$",
           "hf_eager", 1.3),
    Target(5, "Idefics3 pixel-shuffle connector, 17 crops vs eager", "projector", r"idefics3-8b@17$", "hf_eager",
           1.3),
    Target(2, "LLaVA-1.5 projector, B=8 fwd+bwd vs eager", "projector", r"llava-1\.5-7b@8$", "hf_eager", None,
           mode="fwd+bwd"),
    Target(6, "LLaVA-1.5 connector path into inputs_embeds vs eager", "e2e", r"^llava-1\.5-7b connector$",
           "hf_eager", None),
    Target(6, "Qwen2-VL-7B image features (tower + merger) vs eager", "e2e", r"^qwen2-vl-7b full$", "hf_eager",
           None),
]


def _dtype(row):
    return str(row.get("dtype", "")).replace("torch.", "")


def find(rows, suite, shape, mode, provider, dtype=None):
    """The newest row (last in ``rows``) matching; None if there is none."""
    pat = re.compile(shape)
    hit = None
    for r in rows:
        if (r.get("suite") == suite and r.get("provider") == provider and r.get("mode", "fwd") == mode
                and pat.search(str(r.get("shape", ""))) and (dtype is None or _dtype(r) == dtype)):
            hit = r
    return hit


def _why_missing(row, provider):
    if row is None:
        return f"{provider}: not measured"
    return f"{provider}: {row.get('skipped') or row.get('error') or 'no time'}"


def evaluate(rows, ceilings=None):
    """One dict per target: the target, ``value`` (None if not measured), ``status`` and ``note``.

    ``ceilings``: the profile (``devices.Ceilings`` as a dict) for the tflops and bandwidth measures; by default each
    row's own ``roofline_profile`` numbers are not parsed, so pass the session's profile."""
    out = []
    for t in TARGETS:
        fast = find(rows, t.suite, t.shape, t.mode, t.provider, t.dtype)
        base = find(rows, t.suite, t.shape, t.mode, t.baseline, t.dtype) if t.baseline else None
        value, note = None, ""
        if fast is None or fast.get("ms") is None:
            note = _why_missing(fast, t.provider)
        elif t.baseline and (base is None or base.get("ms") is None):
            note = _why_missing(base, t.baseline)
        elif t.measure == "speedup":
            value = base["ms"] / fast["ms"]
        elif t.measure == "roofline":
            value = fast.get("roofline_fraction")
        elif ceilings and t.measure == "tflops" and fast.get("flops"):
            value = fast["flops"] / (fast["ms"] * 1e-3) / (ceilings["bf16_tflops"] * 1e12)
        elif ceilings and t.measure == "bandwidth" and fast.get("min_bytes"):
            value = fast["min_bytes"] / (fast["ms"] * 1e-3) / (ceilings["copy_tbps"] * 1e12)
        else:
            note = "no ceilings (env.json missing)" if not ceilings else "row lacks flops/min_bytes"
        tiny = bool(fast and fast.get("tiny"))
        if value is None:
            status = "not measured"
        elif tiny or "cpu" in str(fast.get("device", "")).lower():
            status = "dry run (no verdict)"
        elif t.threshold is None:
            status = "info"
        else:
            status = "met" if value >= t.threshold else "NOT met"
        out.append(dict(target=t, value=value, status=status, note=note, fast=fast, base=base))
    return out


_EPS = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 2.0 ** -23}


def derived_bound(dtype, k=4096, roundings=4):
    """fastvlm.testing.tolerance's formula (without torch): 2 eps(dtype) sqrt(roundings) + 2 sqrt(K) eps(fp32)."""
    return 2 * _EPS.get(dtype, _EPS["float32"]) * roundings ** 0.5 + 2 * k ** 0.5 * _EPS["float32"]


def accuracy_flags(rows):
    """fastvlm rows whose output (or gradient) error exceeds max(2 x the eager baseline's error in the same group,
    the derived bound for the dtype): a hint that the GPU computes something else than the interpreter did."""
    eager = {"projector": "hf_eager", "perceiver": "hf_eager", "patch_embed": "eager", "qformer": "hf_eager",
             "attention": "sdpa", "e2e": "hf_eager"}
    base = {}
    for r in rows:
        if r.get("provider") == eager.get(r.get("suite")) and r.get("ms") is not None:
            base[(r["suite"], r.get("shape"), r.get("mode", "fwd"), _dtype(r))] = r
    flags = []
    for r in rows:
        if not str(r.get("provider", "")).startswith(FAST) or r.get("ms") is None:
            continue
        b = base.get((r["suite"], r.get("shape"), r.get("mode", "fwd"), _dtype(r)), {})
        bound = derived_bound("bfloat16" if r["provider"].endswith("_bf16") else _dtype(r))  # bf16 compute mode
        for key in ("rel_err", "grad_rel_err"):
            v = r.get(key)
            if v is None:
                continue
            lim = max(2 * (b.get(key) or 0.0), bound)
            if not v <= lim:  # also NaN
                flags.append(dict(row=r, key=key, value=v, limit=lim))
    return flags


def slower_than_eager(rows):
    """Issue 12's floor: fastvlm rows slower than their suite's eager baseline (speedup_vs_eager < 1)."""
    return [r for r in rows if str(r.get("provider", "")).startswith(FAST) and r.get("ms") is not None
            and (r.get("speedup_vs_eager") or float("nan")) < 1.0]
