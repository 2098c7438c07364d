"""PEP 517 build backend: setuptools, plus torch and ninja in the build environment when FASTVLM_BUILD_CUDA=1.

``FASTVLM_BUILD_CUDA=1 pip install .`` builds the CUDA extension inside pip's isolated build environment, which
otherwise has no torch. The extension must be compiled against the torch it will be loaded by, so the torch asked for
is pinned to the version installed in the interpreter running pip (read in a subprocess started with ``-I``, which
ignores the isolation's PYTHONPATH). Without torch there, the newest allowed torch is used and the runtime loader
(fastvlm/_cext.py) rebuilds the extension on first use if the versions disagree. Every other hook is setuptools',
after a check that setuptools is new enough to read pyproject.toml (77, for the PEP 639 license fields).
"""
import os
import subprocess
import sys

import setuptools
from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (build_wheel, build_sdist, prepare_metadata_..., ...)

# pyproject.toml's `license = "Apache-2.0"` and `license-files` (PEP 639) need setuptools 77. pip's isolated build
# installs that ([build-system] requires); `--no-build-isolation` uses the environment's setuptools, and an older one
# fails with an unclear "project.license must be valid exactly by one definition": the build hooks say what to do.
MIN_SETUPTOOLS = 77


def setuptools_problem(version=setuptools.__version__):
    """The message for a setuptools too old to read pyproject.toml, or None."""
    if int(version.split(".")[0]) >= MIN_SETUPTOOLS:
        return None
    return (f"fastvlm: building needs setuptools>={MIN_SETUPTOOLS} (PEP 639 license metadata); this environment has "
            f"setuptools {version}: run `pip install \"setuptools>={MIN_SETUPTOOLS}\"` (or build without "
            "--no-build-isolation)")


def _checked(hook):
    def run(*args, **kwargs):
        problem = setuptools_problem()
        if problem:
            raise SystemExit(problem)
        return hook(*args, **kwargs)

    run.__name__ = run.__qualname__ = hook.__name__
    return run


for _name in ("prepare_metadata_for_build_wheel", "prepare_metadata_for_build_editable", "build_wheel",
              "build_editable", "build_sdist"):
    globals()[_name] = _checked(getattr(_setuptools, _name))

_PROBE = ("import importlib.metadata as m\n"
          "try: print(m.version('torch'))\n"
          "except m.PackageNotFoundError: pass\n")


def installed_torch_version():
    """The torch version of the interpreter that runs pip, or None (no torch there, or it cannot be asked)."""
    try:
        out = subprocess.run([sys.executable, "-I", "-c", _PROBE], capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    except (OSError, subprocess.SubprocessError):
        return None
    version = out.stdout.strip()
    return version or None


def cuda_build_requires():
    if os.environ.get("FASTVLM_BUILD_CUDA", "0") != "1":
        return []
    version = installed_torch_version()
    # A local label (2.14.1+cu130) names one build of that version; the public part is what pip can match.
    return [f"torch=={version.split('+')[0]}" if version else "torch", "ninja"]


def _without_extension(hook, config_settings):
    """setuptools answers these hooks by running setup.py, before torch is in the build environment: tell setup.py
    (FASTVLM_REQUIRES_ONLY) to leave the extension out of that run."""
    os.environ["FASTVLM_REQUIRES_ONLY"] = "1"
    try:
        return hook(config_settings)
    finally:
        del os.environ["FASTVLM_REQUIRES_ONLY"]


def get_requires_for_build_wheel(config_settings=None):
    return _without_extension(_setuptools.get_requires_for_build_wheel, config_settings) + cuda_build_requires()


def get_requires_for_build_editable(config_settings=None):
    return _without_extension(_setuptools.get_requires_for_build_editable, config_settings) + cuda_build_requires()
