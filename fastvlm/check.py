"""``fastvlm check [MODEL_DIR | FAMILY]``: fused modules and patched models against the transformers originals.

Without an argument (the README's main job, no download):
  1. every fused module against its original on a tiny random-weight instance of each supported family, then two
     real-size connectors (LLaVA-1.5-7B's projector at 576 tokens, Qwen2-VL-7B's merger at 1024 patches);
  2. a tiny random LLaVA model patched with ``fastvlm.patch``: logits and greedy generation against the original.
With FAMILY (one of fastvlm.tiny_models.FAMILIES, or its transformers model_type spelling): step 2 for that family.
With MODEL_DIR (a local directory with config.json and safetensors weights): the model is loaded, patched with
``verify=True`` and each swapped module is timed against its original on a random probe.

Rows are named by family, the one naming scheme of ``fastvlm.tiny_models.FAMILIES``. On a terminal a progress bar
(tqdm, on stderr) shows which case runs; it is cleared before each row is printed.

On a GPU the fused modules run their Triton kernels (bf16 in step 1); on a CPU the PyTorch path in fp32, or the
kernels in the Triton interpreter when FASTVLM_BACKEND=triton and TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

import fastvlm
from fastvlm.testing import FAMILIES, args_for, build, case_family, rel_err, tolerance

# real-size connectors: (family, the model they come from, fastvlm.bench.projector shape id)
REAL_SIZES = (("llava", "LLaVA-1.5-7B", "llava-1.5-7b@1"), ("qwen2_vl", "Qwen2-VL-7B", "qwen2-vl-7b@1024"))


@dataclass
class Case:
    family: str  # a name of fastvlm.tiny_models.FAMILIES
    label: str  # what distinguishes cases of one family ("deepstack", "LLaVA-1.5-7B"), or ""
    make: Callable  # () -> (original module, forward arguments as a tuple)


def cases(small=False):
    """The module cases of ``fastvlm check``: the tiny ones, then (unless ``small``) the real sizes."""
    out = [Case(case_family(c), c.partition(":")[2], lambda c=c: _tiny(c)) for c in FAMILIES]
    if not small:
        out += [Case(fam, model, lambda shape=shape: _real_size(shape)) for fam, model, shape in REAL_SIZES]
    return out


def _tiny(case):
    m = build(case)
    return m, args_for(case, m)


def _real_size(shape):
    from fastvlm.bench.projector import build as bench_build

    m, args = bench_build(shape, "cpu", torch.float32)[:2]
    return m, tuple(args)


def _progress(total, desc):
    """A progress bar on stderr, only when stderr is a terminal; print rows with ``bar.write`` (clears it first)."""
    return tqdm(total=total, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False,
                bar_format=desc + " {bar:24} {n_fmt}/{total_fmt} {desc}")


def _timed(fn, device, reps=5):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run_check(target=None, small=False):
    if target is None:
        ok = check_modules(small)
        return check_family("llava") and ok
    if os.path.isdir(target):
        return check_model_dir(target)
    return check_family(target)


def check_family(family):
    """Patch a tiny random model of ``family``; compare logits and greedy tokens with the original."""
    from fastvlm.tiny_models import FAMILIES as MODEL_FAMILIES
    from fastvlm.tiny_models import build_tiny_model, canonical_family

    name = canonical_family(family)
    if name is None:
        raise SystemExit(f"fastvlm check: {family!r} is neither a directory nor a built-in family "
                         f"({', '.join(MODEL_FAMILIES)})")
    model, inputs = build_tiny_model(name)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    report = fastvlm.patch(model, verify=True)
    print(report)
    with torch.no_grad(), fastvlm.trace() as t:
        logits2 = model(**inputs).logits
        tokens2 = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    err = rel_err(logits2, logits)
    same = torch.equal(tokens, tokens2)
    ok = bool(report.patched) and err <= tolerance(torch.float32, logits.shape[-1], 3) and same
    backends = ",".join(sorted(set(t.backends())))
    print(f"tiny {name} model, patched vs original: logits rel err {err:.2e}, greedy tokens "
          f"{'identical' if same else 'DIFFER'}, backends {backends}  {'ok' if ok else 'MISMATCH'}")
    return ok


def check_model_dir(path):
    """Load a local checkpoint, patch it with verification and time each swapped module on its probe."""
    import transformers

    from fastvlm.integrations.transformers import probe_args

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"loading {path} on {device}")
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(path).to(device).eval()
    except ValueError:
        model = transformers.AutoModel.from_pretrained(path).to(device).eval()
    originals = {name: mod for name, mod in model.named_modules()}
    report = fastvlm.patch(model, verify=True)
    print(report)
    ok = all("ok" in e.detail for e in report.patched if e.fused != "hand-off")  # hand-off: exact, tests/test_handoff.py
    with _progress(len(report.patched), "timing") as bar:
        for e in report.patched:
            bar.set_description_str(e.path)
            fused = model.get_submodule(e.path)
            original = originals[e.path]
            recipe = getattr(fused, "_fastvlm_recipe", None)
            if recipe is not None:
                args = probe_args(recipe, fused)
                with torch.no_grad():
                    t_orig = _timed(lambda: original(*args), device)
                    t_fused = _timed(lambda: fused(*args), device)
                bar.write(f"  {e.path}: original {t_orig:.3f} ms, fastvlm {t_fused:.3f} ms on probe "
                          f"{tuple(args[0].shape)} (median of 5; {device})", file=sys.stdout)
            bar.update()
    return ok


def check_modules(small=False):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"fastvlm check on {device} ({dtype}); fused module vs transformers original in float64")
    head = (f"{'family':17} {'original module':40} {'input':>11} {'backend':8} {'rel err':>9} {'bound':>9} "
            f"{'ms':>8}  ok")
    print(head + "\n" + "-" * len(head), flush=True)
    all_ok = True
    todo = cases(small)
    with _progress(len(todo), "fastvlm check") as bar:
        for case in todo:
            bar.set_description_str(f"{case.family} {case.label}".strip())
            row, ok = _run_case(case, device, dtype)
            all_ok &= ok
            bar.write(row, file=sys.stdout)
            bar.update()
    print("all fused modules match their originals" if all_ok else "MISMATCH: see the rows marked NO")
    return all_ok


def _run_case(case, device, dtype):
    """One row of the table: the fused module against its original in float64."""
    torch.manual_seed(0)
    m, args = case.make()
    original = type(m).__name__ + (f" ({case.label})" if case.label else "")
    k = args[0].shape[-1] * 4
    with torch.no_grad():
        ref = m.double()(*(a.double() if a.is_floating_point() else a for a in args))
        m = m.to(device=device, dtype=dtype)
        dargs = tuple(a.to(device=device, dtype=dtype) if a.is_floating_point() else a.to(device) for a in args)
        fused = fastvlm.nn.from_module(m)
        with fastvlm.trace() as t:
            t0 = time.perf_counter()
            out = fused(*dargs)
            if device == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
    err = rel_err(out.cpu(), ref)
    bound = tolerance(dtype, k, roundings=3)
    ok = err <= bound and tuple(out.shape) == tuple(ref.shape)
    backend = ",".join(sorted(set(t.backends()))) or "-"
    shape = "x".join(map(str, args[0].shape))
    row = (f"{case.family:17} {original:40} {shape:>11} {backend:8} {err:9.2e} {bound:9.2e} {ms:8.1f}  "
           f"{'yes' if ok else 'NO'}")
    return row, ok
