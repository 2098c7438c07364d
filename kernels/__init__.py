"""Triton kernels of fastvlm, shipped as ``fastvlm.kernels``.

Each module holds ``@triton.jit`` kernels and their launchers (plain Python functions that validate, allocate and
launch). The torch-facing custom ops live in ``fastvlm.ops``; the plain-PyTorch references in ``fastvlm.reference``.
Importing this package imports triton: callers check ``fastvlm._dispatch.triton_available()`` first.
"""
