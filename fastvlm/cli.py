"""The ``fastvlm`` command: info, check, audit, bench."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import warnings


def _version(mod):
    try:
        return importlib.import_module(mod).__version__
    except Exception as exc:
        return f"not installed ({type(exc).__name__})"


def info(argv=None):
    import torch

    import fastvlm
    from fastvlm import _dispatch

    print(f"fastvlm       {fastvlm.__version__}")
    print(f"python        {platform.python_version()}")
    for mod in ("torch", "triton", "transformers", "timm"):
        print(f"{mod:13} {_version(mod)}")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        print(f"device        {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), CUDA {torch.version.cuda}")
    else:
        print(f"device        cpu ({os.cpu_count()} cores); no CUDA device visible to torch")
    print(f"FASTVLM_BACKEND={os.environ.get('FASTVLM_BACKEND', 'auto')}  FASTVLM_STRICT={os.environ.get('FASTVLM_STRICT', '0')}"
          f"  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    print("backends:")
    ok, why = _dispatch.triton_status()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reasons = _dispatch.environment_reasons(dev) if ok else [why]
    print(f"  triton kernels    {'available' if not reasons else 'not used: ' + '; '.join(reasons)}")
    interp = "on (TRITON_INTERPRET=1)" if _dispatch.interpreter_enabled() else "off (set TRITON_INTERPRET=1 before import, with FASTVLM_BACKEND=triton)"
    print(f"  triton interpreter {interp}")
    from fastvlm import _cext

    print(f"  CUDA extension    {_cext.status()}")
    print("  pytorch path      always available (CPU tensors, fallbacks, FASTVLM_BACKEND=torch)")
    sup = fastvlm.nn.supported()
    print(f"drop-in modules ({len(sup) + 1}): " + ", ".join(sorted(sup.values())) + ", FusedLinear")
    return 0


def check(argv=None):
    """Check fused modules and patched models against the transformers originals (no download by default)."""
    ap = argparse.ArgumentParser(prog="fastvlm check", description=check.__doc__)
    ap.add_argument("target", nargs="?", help="a local model directory (config.json + safetensors) or a built-in "
                    "family name (see fastvlm.tiny_models.FAMILIES); default: every module, then a tiny LLaVA")
    ap.add_argument("--small", action="store_true", help="tiny sizes only (fast under the Triton interpreter)")
    args = ap.parse_args(argv)
    import fastvlm
    from fastvlm.check import run_check

    warnings.simplefilter("ignore", fastvlm.FastVLMFallbackWarning)
    ok = run_check(args.target, small=args.small)
    return 0 if ok else 1


def audit(argv=None):
    from fastvlm.audit import main as audit_main

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # the audit must run without the interpreter: re-run ourselves in a clean child process
        import subprocess

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "fastvlm.audit", *(argv or [])], env=env).returncode
    return audit_main(argv or [])


def bench(argv=None):
    if argv and argv[0] == "qformer":  # fastvlm bench qformer [--quick] ...: the Q-Former suites
        from fastvlm.bench.qformer import main as qformer_main

        return qformer_main(argv[1:])
    from fastvlm.bench.projector import main as bench_main

    return bench_main(argv)


def coverage(argv=None):
    from fastvlm.coverage import main as coverage_main

    return coverage_main(argv or [])


COMMANDS = {"info": info, "check": check, "audit": audit, "bench": bench, "coverage": coverage}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: fastvlm {info,check,audit,bench,coverage} [options]\n\n"
              "  info   versions, device, which backends are available and why not\n"
              "  check  fused modules vs their transformers originals on built-in random-weight models (no download)\n"
              "  audit  compile every kernel for sm_90a (no GPU needed): registers, spills, shared memory, wgmma\n"
              "  bench  projector microbenchmark vs transformers eager and torch.compile (GPU; CPU path otherwise);\n"
              "         `fastvlm bench qformer` for the Q-Former and its attention core\n"
              "  coverage  every family of the installed transformers' image-text-to-text mapping: fused, or why not")
        return 0 if argv and argv[0] in ("-h", "--help") else (2 if argv else 0)
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
