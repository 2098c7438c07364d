"""Build script. The package is pure Python unless FASTVLM_BUILD_CUDA=1 asks for the optional CUDA extension.

The extension (``fastvlm._C``) is built from csrc/ with torch's BuildExtension and ninja:
``FASTVLM_BUILD_CUDA=1 pip install .``. Building it needs torch in the build environment: the in-tree build backend
(buildtools/fastvlm_backend.py) adds torch, pinned to the version installed where pip runs, and ninja to pip's isolated
build environment when FASTVLM_BUILD_CUDA=1; ``--no-build-isolation`` builds against the installed torch directly.
Without FASTVLM_BUILD_CUDA, fastvlm runs its Triton kernels and PyTorch paths, and builds the extension on first use
instead (fastvlm/_cext.py; cached under ~/.cache/fastvlm); ``fastvlm info`` says whether the extension is present.

The build settings (CUDA_HOME, TORCH_CUDA_ARCH_LIST, include paths, flags) come from fastvlm/_cext.py, loaded by
path without importing fastvlm, so both builds agree. On a machine without a GPU they are: the toolkit root holding
bin/nvcc and libcudart, TORCH_CUDA_ARCH_LIST=9.0a (set either variable to override), and the torch wheel's
nvidia/cu13/include for the CUDA library headers the toolkit may lack.
"""
import glob
import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cext_module():
    spec = importlib.util.spec_from_file_location("_fastvlm_cext_build", os.path.join(HERE, "fastvlm", "_cext.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cuda_extensions():
    if os.environ.get("FASTVLM_BUILD_CUDA", "0") != "1" or os.environ.get("FASTVLM_REQUIRES_ONLY") == "1":
        return {}
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        print("fastvlm: FASTVLM_BUILD_CUDA=1 but csrc/ has no sources yet; building the pure-Python package")
        return {}
    settings = _cext_module().build_settings()
    for key, value in settings["env"].items():  # before cpp_extension reads CUDA_HOME at import
        if value and not os.environ.get(key):
            os.environ[key] = value
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        raise SystemExit("fastvlm: FASTVLM_BUILD_CUDA=1 needs torch in the build environment; pip gets it through "
                         "buildtools/fastvlm_backend.py, other frontends may not: run `FASTVLM_BUILD_CUDA=1 pip "
                         "install --no-build-isolation .`, or leave FASTVLM_BUILD_CUDA unset and the extension is "
                         f"built on first use ({exc})") from exc

    ext = CUDAExtension(
        name="fastvlm._C",
        sources=sources,
        include_dirs=settings["include_dirs"],
        extra_compile_args={"cxx": settings["cxx_flags"], "nvcc": settings["nvcc_flags"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**cuda_extensions())
