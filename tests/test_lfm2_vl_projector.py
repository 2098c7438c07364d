"""LFM2-VL's projector: pixel unshuffle of a [B, H, W, C] grid of any aspect, optional LayerNorm, MLP, fused as the
space-to-depth GEMM (recipe ``lfm2_vl``). Cohere2-Vision's projector is covered as a whole model in tests/test_patch.py
and tests/test_handoff.py (family ``cohere2_vision``)."""
import pytest
import torch

import fastvlm
from fastvlm.testing import randomize_, rel_err
from helpers import assert_close


def _projector(layernorm, C=24, factor=2):
    from transformers import Lfm2VlConfig
    from transformers.models.lfm2_vl.modeling_lfm2_vl import Lfm2VlMultiModalProjector

    cfg = Lfm2VlConfig(vision_config=dict(hidden_size=C), text_config=dict(hidden_size=40), projector_hidden_size=56,
                       downsample_factor=factor, projector_use_layernorm=layernorm)
    return randomize_(Lfm2VlMultiModalProjector(cfg).eval())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layernorm", [True, False])
@pytest.mark.parametrize("grid,factor", [((6, 4), 2), ((3, 9), 3)], ids=["6x4_f2", "3x9_f3"])
def test_matches_original(backend, layernorm, grid, factor, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    m = _projector(layernorm, factor=factor)
    fused = fastvlm.nn.from_module(m)
    assert list(fused.state_dict()) == list(m.state_dict())
    x = torch.randn(2, *grid, 24)
    with torch.no_grad(), fastvlm.trace() as t:
        out = fused(x)
    assert [r.backend for r in t.records] == [backend], str(t)
    with torch.no_grad():
        ref = m.double()(x.double())
    assert out.shape == ref.shape == (2, grid[0] // factor, grid[1] // factor, 40)
    assert_close(out, ref, torch.float32, 24 * factor * factor, roundings=3)


def test_gradients(torch_backend):
    m = _projector(True).double()
    fused = fastvlm.nn.from_module(m)
    x = torch.randn(2, 4, 6, 24, dtype=torch.float64, requires_grad=True)
    params = [x] + list(m.parameters())
    g = torch.randn(2, 2, 3, 40, dtype=torch.float64)
    ref = torch.autograd.grad(m(x), params, g)
    got = torch.autograd.grad(fused(x), params, g)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-12


def test_grid_not_divisible_keeps_the_original_error(torch_backend, quiet_fallbacks):
    m = _projector(False)
    fused = fastvlm.nn.from_module(m)
    x = torch.randn(1, 5, 4, 24)
    with pytest.raises(RuntimeError) as original:
        m(x)
    with pytest.raises(RuntimeError) as ours, fastvlm.trace() as t:
        fused(x)
    assert str(ours.value) == str(original.value)
    assert "not a [batch, h, w, features] grid divisible by the scale 2" in t.records[0].reasons[0]
