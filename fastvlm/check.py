"""``fastvlm check [MODEL_DIR | FAMILY]``: fused modules and patched models against the transformers originals.

Without an argument (the README's main job, no download):
  1. every fused module against its original on a tiny random-weight instance of each supported family, then two
     real-size connectors (LLaVA-1.5-7B's projector at 576 tokens, Qwen2-VL-7B's merger at 1024 patches);
  2. a tiny random LLaVA model patched with ``fastvlm.patch``: logits and greedy generation against the original.
With FAMILY (one of fastvlm.tiny_models.FAMILIES): step 2 for that family's tiny model.
With MODEL_DIR (a local directory with config.json and safetensors weights): the model is loaded, patched with
``verify=True`` and each swapped module is timed against its original on a random probe.

On a GPU the fused modules run their Triton kernels (bf16 in step 1); on a CPU the PyTorch path in fp32, or the
kernels in the Triton interpreter when FASTVLM_BACKEND=triton and TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import sys
import time

import torch

import fastvlm
from fastvlm.testing import FAMILIES, args_for, build, rel_err, tolerance


def _cases(small):
    for fam in FAMILIES:
        yield fam, (lambda fam=fam: _tiny(fam))
    if not small:
        from fastvlm.bench.projector import build as bench_build

        for shape in ("llava-1.5-7b@1", "qwen2-vl-7b@1024"):
            yield shape, (lambda shape=shape: (lambda m, x, *_: (m, (x,)))(*bench_build(shape, "cpu", torch.float32)))


def _tiny(fam):
    m = build(fam)
    return m, args_for(fam, m)


def _progress(i, n, label):
    """A one-line progress bar on stderr (only when it is a terminal)."""
    if not sys.stderr.isatty():
        return
    done = int(24 * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (24 - done)}] {i}/{n} {label:<40}")
    if i == n:
        sys.stderr.write("\r" + " " * 80 + "\r")
    sys.stderr.flush()


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
    from fastvlm.tiny_models import build_tiny_model

    if family not in MODEL_FAMILIES:
        raise SystemExit(f"fastvlm check: {family!r} is neither a directory nor a built-in family "
                         f"({', '.join(MODEL_FAMILIES)})")
    model, inputs = build_tiny_model(family)
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
    print(f"tiny {family} model, patched vs original: logits rel err {err:.2e}, greedy tokens "
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
    for i, e in enumerate(report.patched, 1):
        _progress(i, len(report.patched), e.path)
        fused = model.get_submodule(e.path)
        original = originals[e.path]
        recipe = getattr(fused, "_fastvlm_recipe", None)
        if recipe is None:
            continue
        args = probe_args(recipe, fused)
        with torch.no_grad():
            t_orig = _timed(lambda: original(*args), device)
            t_fused = _timed(lambda: fused(*args), device)
        print(f"  {e.path}: original {t_orig:.3f} ms, fastvlm {t_fused:.3f} ms on probe {tuple(args[0].shape)} "
              f"(median of 5; {device})")
    return ok


def check_modules(small=False):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"fastvlm check on {device} ({dtype}); fused module vs transformers original in float64")
    head = f"{'connector':22} {'class':38} {'backend':8} {'rel err':>9} {'bound':>9} {'ms':>8}  ok"
    print(head + "\n" + "-" * len(head))
    all_ok = True
    cases = list(_cases(small))
    for i, (name, make) in enumerate(cases, 1):
        _progress(i, len(cases), name)
        torch.manual_seed(0)
        m, args = make()
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
        all_ok &= ok
        backend = ",".join(sorted(set(t.backends()))) or "-"
        print(f"{name:22} {type(fused).__name__:38} {backend:8} {err:9.2e} {bound:9.2e} {ms:8.1f}  {'yes' if ok else 'NO'}")
    print("all fused modules match their originals" if all_ok else "MISMATCH: see the rows marked NO")
    return all_ok
