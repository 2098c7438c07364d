"""The in-tree PEP 517 backend (buildtools/fastvlm_backend.py): with FASTVLM_BUILD_CUDA=1 it asks pip's isolated
build environment for the torch installed here (same version, so the extension's ABI matches) and ninja; without it,
nothing beyond setuptools. setup.py must not need torch while pip only asks for the requirements.

The whole isolated build (``FASTVLM_BUILD_CUDA=1 pip install .`` into a fresh venv: a torch install plus an nvcc build,
4-5 minutes on 2 cores) is marked slow.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _backend():
    spec = importlib.util.spec_from_file_location("fastvlm_backend_under_test",
                                                  os.path.join(ROOT, "buildtools", "fastvlm_backend.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pyproject_names_the_backend():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert 'build-backend = "fastvlm_backend"' in text and 'backend-path = ["buildtools"]' in text


def test_requires_pinned_torch_and_ninja_only_when_asked(monkeypatch):
    backend = _backend()
    monkeypatch.delenv("FASTVLM_BUILD_CUDA", raising=False)
    assert backend.cuda_build_requires() == []
    monkeypatch.setenv("FASTVLM_BUILD_CUDA", "1")
    assert backend.installed_torch_version().split("+")[0] == torch.__version__.split("+")[0]
    assert backend.cuda_build_requires() == [f"torch=={torch.__version__.split('+')[0]}", "ninja"]


def test_setup_py_needs_no_torch_while_requirements_are_asked():
    """Run setup.py's extension hook in a python where ``import torch`` fails, as in pip's fresh build environment."""
    code = ("import sys, runpy\n"
            "sys.modules['torch'] = None\n"  # any `import torch` raises ImportError
            "import setuptools\n"
            "setuptools.setup = lambda **kw: print('EXT', sorted(kw))\n"
            "runpy.run_path('setup.py')\n")
    env = dict(os.environ, FASTVLM_BUILD_CUDA="1", FASTVLM_REQUIRES_ONLY="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "EXT []" in out.stdout
    env.pop("FASTVLM_REQUIRES_ONLY")  # the real build step without torch: a clear message, not a traceback
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "--no-build-isolation" in out.stderr


@pytest.mark.slow
def test_isolated_cuda_build(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", ROOT], check=True,
                   env=dict(os.environ, FASTVLM_BUILD_CUDA="1"), cwd=str(tmp_path))
    out = subprocess.run([py, "-c", "import fastvlm._C, torch; print(torch.ops.fastvlm_ext.normalize_tiles)"],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0 and "normalize_tiles" in out.stdout, out.stderr
