"""``fastvlm check``: every fused module against its transformers original, on built-in random-weight models.

Tiny instances of every supported family, then two real-size connectors (LLaVA-1.5-7B's projector at 576 tokens,
Qwen2-VL-7B's merger at 1024 patches). On a GPU the fused modules run their Triton kernels in bf16 and are compared
with the original in float64; on a CPU they run the PyTorch path in fp32 (or the kernels under the Triton interpreter
when FASTVLM_BACKEND=triton and TRITON_INTERPRET=1). Nothing is downloaded.
"""
from __future__ import annotations

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


def run_check(small=False):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"fastvlm check on {device} ({dtype}); fused module vs transformers original in float64")
    head = f"{'connector':22} {'class':38} {'backend':8} {'rel err':>9} {'bound':>9} {'ms':>8}  ok"
    print(head + "\n" + "-" * len(head))
    all_ok = True
    for name, make in _cases(small):
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
