"""The hot path's cheap reads give what the plain reads give: environment variables (read through os.environ's own
dict), the TF32 flag (its C getter), the trace check (a counter of open traces)."""
import os

import pytest
import torch

from fastvlm import _dispatch, _hot


@pytest.mark.parametrize("value", [None, "auto", "torch", " Triton ", "", "ünïcode"])
def test_getenv_follows_os_environ(monkeypatch, value):
    for name in ("FASTVLM_BACKEND", "FASTVLM_STRICT", "TRITON_INTERPRET"):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        assert _dispatch.getenv(name, "dflt") == os.environ.get(name, "dflt")
    os.environ["FASTVLM_STRICT"] = "1"  # a plain assignment and deletion, as users do
    try:
        assert _dispatch.strict()
    finally:
        del os.environ["FASTVLM_STRICT"]
    assert not _dispatch.strict()


def test_requested_backend_reads_every_call(monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", "torch")
    assert _dispatch.requested_backend() == "torch"
    monkeypatch.setenv("FASTVLM_BACKEND", " TRITON")
    assert _dispatch.requested_backend() == "triton"
    monkeypatch.setenv("FASTVLM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTVLM_BACKEND"):
        _dispatch.requested_backend()


def test_allow_tf32_follows_the_flag():
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for flag in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = flag
            assert _hot.allow_tf32() is torch.backends.cuda.matmul.allow_tf32 is flag
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_tracing_counts_open_traces():
    assert not _dispatch.tracing()
    with _dispatch.trace():
        assert _dispatch.tracing()
        with pytest.raises(RuntimeError):
            with _dispatch.trace():
                raise RuntimeError("inside")
        assert _dispatch.tracing()
    assert not _dispatch.tracing() and _dispatch._open_traces == 0
