"""Test setup. Runs before anything imports triton.

Without a GPU, TRITON_INTERPRET=1 is set so that tests which select FASTVLM_BACKEND=triton run the real kernels in
the Triton interpreter, made strict by tests/interp_guard.py. The sm_90 compile audit runs in its own process without
the interpreter (tests/compile/).
"""
import os
import sys

import pytest

_HERE = os.path.dirname(__file__)
sys.path.insert(0, _HERE)

import torch  # noqa: E402  (importing torch does not import triton)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_HERE, "..", ".triton_cache"))
os.environ.pop("FASTVLM_BACKEND", None)
os.environ.pop("FASTVLM_STRICT", None)

if not HAS_CUDA:
    import interp_guard  # noqa: E402

    interp_guard.install()

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interp = pytest.mark.skip(reason="interpreter test on CPU tensors; on a GPU machine the device-parametrised "
                                          "and gpu-marked tests cover the kernels")
    run_slow = "slow" in (config.getoption("-m") or "")
    skip_slow = pytest.mark.skip(reason="slow (minutes): run with -m slow")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if HAS_CUDA and params.get("backend") == "triton" and "device" not in item.fixturenames:
            item.add_marker(skip_interp)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def triton_backend(monkeypatch, request):
    """Run fastvlm ops on their Triton kernels (the interpreter on CPU).

    On a CUDA machine the interpreter is off, so a test that builds CPU tensors cannot run its kernels: it is skipped
    there (tests that take the ``device`` fixture run on the GPU instead, as do the ``gpu``-marked tests)."""
    if HAS_CUDA and "device" not in request.fixturenames:
        pytest.skip("interpreter test on CPU tensors; on a GPU machine the device-parametrised tests cover the kernels")
    monkeypatch.setenv("FASTVLM_BACKEND", "triton")
    yield


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", "torch")
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """A family whose class the installed transformers lacks is skipped, not failed (older/newer releases)."""
    outcome = yield
    from fastvlm.testing import FamilyUnavailable

    if outcome.excinfo is not None and issubclass(outcome.excinfo[0], FamilyUnavailable):
        pytest.skip(str(outcome.excinfo[1]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def quiet_fallbacks():
    """Silence FastVLMFallbackWarning (tests that use it check fallbacks through fastvlm.trace() instead)."""
    import warnings

    import fastvlm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastvlm.FastVLMFallbackWarning)
        yield
