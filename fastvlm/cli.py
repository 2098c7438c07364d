"""The ``fastvlm`` command: info, check, audit, bench."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import textwrap
import warnings

_INSTALL_HF = 'install it with: pip install "fastvlm[hf]" (in a source checkout: pip install ".[hf]")'
TESTED_TRANSFORMERS = "5.17 to 5.24"  # the README's "Tested versions"; .ci/run and .ci/oldest-transformers


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
    missing = _missing_hf()
    if missing:
        print(f"drop-in modules: FusedLinear only; the fused transformers classes need transformers, which is not "
              f"installed ({missing}): {_INSTALL_HF}")
    else:
        names = sorted(fastvlm.nn.supported().values()) + ["FusedLinear"]
        print(f"drop-in modules ({len(names)}): " + ", ".join(names))
    return 0


def check(argv=None):
    """Check fused modules and patched models against the transformers originals (no download by default)."""
    from fastvlm.tiny_models import ALIASES, FAMILIES, canonical_family

    aliases = ", ".join(f"{a} = {f}" for a, f in ALIASES.items())
    ap = argparse.ArgumentParser(
        prog="fastvlm check", description=check.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="families:\n" + textwrap.fill(", ".join(FAMILIES), 100, initial_indent="  ", subsequent_indent="  ")
        + f"\n  (transformers' model_type spellings are accepted too: {aliases}; '-' for '_')")
    ap.add_argument("target", nargs="?", help="a local model directory (config.json + safetensors) or a built-in "
                    "family (listed below): its tiny random model patched end to end; default: every fused module "
                    "(tiny and real sizes), then the tiny LLaVA model")
    ap.add_argument("--small", action="store_true", help="tiny sizes only (fast under the Triton interpreter)")
    args = ap.parse_args(argv)
    if args.target is not None and not os.path.isdir(args.target) and canonical_family(args.target) is None:
        ap.error(f"{args.target!r} is neither a directory nor a built-in family (families: {', '.join(FAMILIES)})")
    _require_hf("check")
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
    if not argv or argv[0] not in ("-h", "--help"):
        _require_hf("bench")
    if argv and argv[0] == "qformer":  # fastvlm bench qformer [--quick] ...: the Q-Former suites
        from fastvlm.bench.qformer import main as qformer_main

        return qformer_main(argv[1:])
    from fastvlm.bench.projector import main as bench_main

    return bench_main(argv)


def model(argv=None):
    """The performance model at the canonical shapes (an estimate, no GPU needed)."""
    from fastvlm.perfmodel import main as model_main

    return model_main(argv or [])


def coverage(argv=None):
    """Every family of the installed transformers' image-text-to-text mapping: fused, or why not."""
    _require_hf("coverage")
    from fastvlm.coverage import main as coverage_main

    return coverage_main(argv or [])


COMMANDS = {"info": info, "check": check, "audit": audit, "bench": bench, "model": model, "coverage": coverage}
USAGE = """usage: fastvlm {info,check,audit,bench,model,coverage} [options]

  info   versions, device, which backends are available and why not
  check  fused modules vs their transformers originals on built-in random-weight models (no download);
         `fastvlm check --help` lists the families
  audit  compile every kernel for sm_90a (no GPU needed): registers, spills, shared memory, wgmma
  bench  projector microbenchmark vs transformers eager and torch.compile (GPU; CPU path otherwise);
         `fastvlm bench qformer` for the Q-Former and its attention core
  model  performance model at the canonical shapes: FLOPs, bytes, SM fill, H100/H200 bounds (an estimate)
  coverage  every family of the installed transformers' image-text-to-text mapping: fused, or why not"""


class _NeedsHF(Exception):
    """A command needs transformers, which is not installed: the message says how to install it."""


def _missing_hf(names=("transformers",)):
    """The import error of the first of ``names`` that does not import, as text; "" when all do."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            return f"{type(exc).__name__}: {exc}"
    return ""


def _require_hf(command):
    missing = _missing_hf()
    if missing:
        raise _NeedsHF(f"fastvlm {command}: needs transformers, which is not installed ({missing}); {_INSTALL_HF}")


def _hf_import_error(exc):
    """The missing top-level package (transformers or timm) behind ``exc`` or its causes, else None."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in ("transformers", "timm"):
            return exc.name.split(".")[0]
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        print(f"fastvlm: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except _NeedsHF as exc:
        print(exc, file=sys.stderr)
    except ImportError as exc:  # includes fastvlm.testing.FamilyUnavailable
        from fastvlm.testing import FamilyUnavailable

        package = _hf_import_error(exc)
        if package is not None:
            print(f"fastvlm {argv[0]}: needs {package}, which is not installed ({exc}); {_INSTALL_HF}",
                  file=sys.stderr)
        elif isinstance(exc, FamilyUnavailable):
            print(f"fastvlm {argv[0]}: {exc}; fastvlm is tested with transformers {TESTED_TRANSFORMERS}, "
                  f"installed: {_version('transformers')}", file=sys.stderr)
        else:
            raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
