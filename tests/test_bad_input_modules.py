"""Bad and edge-case input to the drop-in modules (issue 14, sections 3 and 5), on both paths: input the original
rejects raises the original's error, input it accepts gives its result (a Qwen-VL merger fed rows of the wrong width,
meta tensors, zero images). The ops' side is tests/test_bad_input.py."""
import re

import pytest
import torch

import fastvlm
from fastvlm.testing import FAMILIES, args_for, build
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("quiet_fallbacks")


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Both paths: the PyTorch path, and the kernels (in the interpreter on CPU)."""
    monkeypatch.setenv("FASTVLM_BACKEND", request.param)
    return request.param


def _outcome(fn):
    """("ok", shape, dtype) or ("error", type, message) of a call."""
    try:
        y = fn()
    except Exception as exc:  # noqa: BLE001  (the comparison is the point)
        return ("error", type(exc), str(exc))
    return ("ok", tuple(y.shape), y.dtype)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_merger_rejects_a_wrong_last_dimension_as_the_original(family, backend):
    """16 x 30 elements are 5 rows of the merged width 96, but the norm runs over 24 features: the original raises."""
    m = build(family)
    x = torch.randn(16, 30)
    with torch.no_grad():
        with pytest.raises(Exception) as orig:
            m(x)
        with pytest.raises(type(orig.value), match=re.escape(str(orig.value))):
            fastvlm.nn.from_module(m)(x)


def test_qwen3_postshuffle_norm_takes_any_last_dimension_as_the_original(backend):
    """With the norm after the merge, the original only views x as rows of the merged width: the fused module too."""
    m = build("qwen3_vl_deepstack")
    x = torch.randn(16, 30)
    with torch.no_grad():
        out = fastvlm.nn.from_module(m)(x)
        ref = m.double()(x.double())
    assert_close(out, ref, torch.float32, 96, roundings=3)


def test_qwen2_5_rmsnorm_broadcast_input_as_the_original(backend):
    """A width-1 input broadcasts through the original's RMSNorm weight ([4, 1] -> [4, 24] -> one merged row)."""
    m = build("qwen2_5_vl")
    x = torch.randn(4, 1)
    with torch.no_grad():
        out = fastvlm.nn.from_module(m)(x)
        ref = m.double()(x.double())
    assert out.shape == ref.shape == (1, 40)
    assert_close(out, ref, torch.float32, 96, roundings=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_input_like_the_original(family, backend):
    """Shape tracing on the meta device: the fused module gives the original's shape (or the original's error)."""
    m = build(family).to("meta")
    args = tuple(a.to("meta") for a in args_for(family, build(family)))
    fused = fastvlm.nn.from_module(m)
    with torch.no_grad():
        ref = _outcome(lambda: m(*args))
        out = _outcome(lambda: fused(*args))
    assert out[:2] == ref[:2], (out, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_images_like_the_original(family, backend):
    """B = 0: the original's empty result, or its error (some originals reshape with -1 and reject 0 images)."""
    m = build(family)
    args = args_for(family, m)
    empty = (args[0][:0],) + tuple(a[:0] for a in args[1:])
    with torch.no_grad():
        ref = _outcome(lambda: m(*empty))
        out = _outcome(lambda: fastvlm.nn.from_module(m)(*empty))
    assert out == ref


def _pooler(mode):
    import transformers
    from transformers.models.llava_next_video.modeling_llava_next_video import (
        LlavaNextVideoMultiModalProjector, LlavaNextVideoPooler)

    cfg = transformers.LlavaNextVideoConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=24, intermediate_size=32, num_attention_heads=4,
                           num_hidden_layers=1, image_size=84, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=1, vocab_size=100),
        spatial_pool_mode=mode, spatial_pool_stride=2)
    return LlavaNextVideoPooler(cfg), LlavaNextVideoMultiModalProjector(cfg)


@pytest.mark.parametrize("mode", ["average", "max", "conv"])
def test_zero_frames_pooler_and_pool_projector(mode, backend):
    pooler, proj = _pooler(mode)
    x = torch.randn(0, 36, 24)  # no frames of a 6 x 6 grid
    with torch.no_grad():
        ref = pooler(x)
        assert fastvlm.nn.from_module(pooler)(x).shape == ref.shape == (0, 9, ref.shape[-1])
        if mode != "conv":
            out = fastvlm.nn.LlavaNextVideoPoolProjector(pooler, proj)(x)
            assert out.shape == proj(ref).shape == (0, 9, 32)


def test_zero_images_internvl_shuffle_projector(backend):
    proj = build("internvl")
    C = proj.linear_1.in_features // 4
    with torch.no_grad():
        out = fastvlm.nn.InternVLShuffleProjector.from_projector(proj, 0.5)(torch.randn(0, 16, C))
    assert out.shape == (0, 4, proj.linear_2.out_features)
    with pytest.raises(ValueError, match=r"vision_features must be \[batch, tokens, channels\]"):
        fastvlm.nn.InternVLShuffleProjector.from_projector(proj, 0.5)(torch.randn(16, C))


def test_deferred_input_the_original_accepts_is_reported(backend):
    """Input handed to the original that it accepts (a broadcasting norm) is never silent: trace() records the
    fallback with its reason, while valid input takes the fused path."""
    m = build("qwen2_5_vl")
    fused = fastvlm.nn.from_module(m)
    with torch.no_grad(), fastvlm.trace() as t:
        fused(torch.randn(8, 24))
    assert t.backends() == [backend], str(t)
    with torch.no_grad(), fastvlm.trace() as t:
        fused(torch.randn(4, 1))
    assert [r.backend for r in t.records] == ["torch"] and "norm's width" in t.records[0].reasons[0], str(t)



@pytest.mark.parametrize("kind", ["cabs1", "cabs0", "ldp"])
def test_feature_map_projectors_on_meta(kind, backend):
    """The CNN-map projectors (C-Abstractor, LDPv2) on meta input: their autocast check raised for meta tensors."""
    from fastvlm.reference.feature_map import CAbstractor, LDPv2Projector

    ref = (CAbstractor(12, 16, 20, num_input_tokens=36, num_queries=9, depth=int(kind[-1])) if kind != "ldp"
           else LDPv2Projector(12, 20, 9)).eval().to("meta")
    x = torch.randn(2, 36, 12, device="meta")
    with torch.no_grad():
        assert _outcome(lambda: fastvlm.nn.from_module(ref)(x)) == _outcome(lambda: ref(x)) == \
            ("ok", (2, 9, 20), torch.float32)
