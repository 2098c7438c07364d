"""Build script. The package is pure Python unless FASTVLM_BUILD_CUDA=1 asks for the optional CUDA extension.

The extension (``fastvlm._C``) is built from csrc/ with torch's BuildExtension and ninja. Building it needs torch in
the build environment, so use ``FASTVLM_BUILD_CUDA=1 pip install --no-build-isolation .``. Without it, fastvlm runs
its Triton kernels and PyTorch paths; ``fastvlm info`` says whether the extension is present.
"""
import glob
import os

from setuptools import setup


def cuda_extensions():
    if os.environ.get("FASTVLM_BUILD_CUDA", "0") != "1":
        return {}
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        print("fastvlm: FASTVLM_BUILD_CUDA=1 but csrc/ has no sources yet; building the pure-Python package")
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        name="fastvlm._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**cuda_extensions())
