"""The checkout's kernels/ directory is ``fastvlm.kernels``; run from the repository root (``python -m pytest`` puts it
on sys.path) it must not take the top-level name ``kernels`` from Hugging Face's package, which transformers imports
when installed (transformers 5.24 requires it). Where that package is absent the name is left alone."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import importlib.metadata, os, sys
try:
    import kernels
except ImportError as exc:
    print("importerror", exc)
else:
    print("module", os.path.abspath(kernels.__file__))
try:
    importlib.metadata.distribution("kernels")
    print("installed")
except importlib.metadata.PackageNotFoundError:
    print("absent")
import fastvlm.kernels
print("fastvlm", fastvlm.kernels.__name__)
"""


def test_top_level_kernels_is_never_this_checkout():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert out.returncode == 0, out.stderr[-2000:]
    first, dist, fast = out.stdout.strip().splitlines()[-3:]
    assert fast == "fastvlm fastvlm.kernels"
    if dist == "installed":  # Hugging Face's package answers to the name, not this checkout's directory
        assert first.startswith("module ") and not first[len("module "):].startswith(os.path.join(ROOT, "kernels"))


def test_transformers_imports_from_the_repository_root():
    """transformers' hub-kernels integration imports ``kernels`` when Hugging Face's package is installed."""
    code = "import transformers.activations, transformers.models.idefics2.modeling_idefics2; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
