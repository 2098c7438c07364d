"""Triton kernels of fastvlm, shipped as ``fastvlm.kernels``.

Each module holds ``@triton.jit`` kernels and their launchers (plain Python functions that validate, allocate and
launch). The torch-facing custom ops live in ``fastvlm.ops``; the plain-PyTorch references in ``fastvlm.reference``.
Importing this package imports triton: callers check ``fastvlm._dispatch.triton_available()`` first.
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path (``python -m pytest`` or a script run
    # from the checkout). That name belongs to Hugging Face's ``kernels`` package, which transformers imports when it
    # is installed; hand the name over to it so transformers keeps working. fastvlm's kernels are ``fastvlm.kernels``.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None:  # (without it the name stays here, as before: transformers probes it and moves on)
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
