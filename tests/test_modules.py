"""Drop-in modules vs the transformers originals: outputs, state_dict, parameter sharing, checkpoints, fallbacks."""
import os
import tempfile

import pytest
import torch
import torch.nn as nn

import fastvlm
from fastvlm.testing import FAMILIES, args_for, build, input_for
from helpers import assert_close, rel_err

pytestmark = pytest.mark.usefixtures("quiet_fallbacks")  # fallback warnings are asserted through trace()


def _f64(args):
    return tuple(a.double() if a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_path_matches_original_fp32(family, torch_backend):
    m = build(family)
    fused = fastvlm.nn.from_module(m)
    assert isinstance(fused, type(m)) and type(fused) is not type(m)
    args = args_for(family, m)
    with torch.no_grad(), fastvlm.trace() as t:
        out = fused(*args)
    assert t.records and all(r.op == "fastvlm::mlp_projector" for r in t.records), str(t)  # no module fallback
    with torch.no_grad():
        ref = m(*args)
    assert out.shape == ref.shape
    assert_close(out, ref, torch.float32, args[0].shape[-1] * 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_path_matches_original(family, triton_backend):
    """The real kernels (the interpreter on CPU) against the module in float64."""
    m = build(family)
    fused = fastvlm.nn.from_module(m)
    args = args_for(family, m)
    with torch.no_grad(), fastvlm.trace() as t:
        out = fused(*args)
    assert set(t.backends()) == {"triton"}, str(t)
    with torch.no_grad():
        assert_close(out, m.double()(*_f64(args)), torch.float32, args[0].shape[-1] * 4)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "quick_gelu", "silu", "relu", "gelu_new"])
def test_llava_activations(act, triton_backend):
    m = build("llava", act=act)
    fused = fastvlm.nn.from_module(m)
    x = input_for("llava", m)
    with torch.no_grad(), fastvlm.trace() as t:
        out = fused(x)
    assert t.backends() == ["triton"], str(t)
    with torch.no_grad():
        assert_close(out, m.double()(x.double()), torch.float32, x.shape[-1])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "internvl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_kernel_vs_float64(family, dtype, triton_backend):
    m = build(family).to(dtype)
    x = input_for(family, m).to(dtype)
    with torch.no_grad():
        out = fastvlm.nn.from_module(m)(x)
        ref = m.double()(x.double())  # float64 math on the same rounded weights and inputs
    assert_close(out, ref, dtype, x.shape[-1], roundings=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_and_sharing(family):
    m = build(family)
    fused = fastvlm.nn.from_module(m)
    sd, fsd = m.state_dict(), fused.state_dict()
    assert list(sd) == list(fsd)
    for k in sd:
        assert sd[k].shape == fsd[k].shape and sd[k].dtype == fsd[k].dtype
        assert sd[k].data_ptr() == fsd[k].data_ptr(), f"{k} was copied"
    # later updates are seen by both
    name, p = next(iter(m.named_parameters()))
    with torch.no_grad():
        p.add_(1.0)
    assert torch.equal(dict(fused.named_parameters())[name], p)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "vipllava"])
def test_constructor_and_checkpoint_load(family, torch_backend):
    """Fused<Original>(same args) builds the same module; an original safetensors checkpoint loads unchanged."""
    from safetensors.torch import load_file, save_file

    m = build(family)
    recipe, _ = fastvlm.nn.recipe_for(m)
    cls = getattr(fastvlm.nn, recipe.fused_name)
    if family == "qwen2_vl":
        fresh = cls(dim=40, context_dim=24, spatial_merge_size=2)
    else:
        cfg_cls = {"llava": "LlavaConfig", "vipllava": "VipLlavaConfig"}[family]
        import transformers

        from fastvlm.testing import CLIP, LLAMA

        fresh = cls(getattr(transformers, cfg_cls)(vision_config=CLIP, text_config=LLAMA))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "proj.safetensors")
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path)
        missing, unexpected = fresh.load_state_dict(load_file(path), strict=True)
    assert not missing and not unexpected
    x = input_for(family, m)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), m(x))


def test_forward_keyword_argument_names(torch_backend):
    m = build("vipllava")
    fused = fastvlm.nn.from_module(m)
    x = input_for("vipllava", m)
    with torch.no_grad():
        assert torch.equal(fused(hidden_states=x), m(hidden_states=x))
    q = fastvlm.nn.from_module(build("qwen2_vl"))
    assert "x" in q.forward.__code__.co_varnames


def test_blip2_language_projection_is_a_linear(triton_backend):
    lin = nn.Linear(24, 40)
    fused = fastvlm.nn.from_module(lin)
    assert isinstance(fused, nn.Linear) and fused.weight is lin.weight
    x = torch.randn(2, 32, 24)
    with torch.no_grad():
        assert_close(fused(x), lin.double()(x.double()), torch.float32, 24)


def test_unsupported_module_raises_with_reason():
    with pytest.raises(TypeError, match="no fused equivalent for torch.nn.modules.conv.Conv2d"):
        fastvlm.nn.from_module(nn.Conv2d(3, 8, 3))


def test_fallbacks_are_explained(monkeypatch, triton_backend):
    """A wrapped linear (as PEFT/LoRA does), an unknown activation, hooks and autocast each fall back with reason."""

    class LoraLike(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    m = build("llava")
    fused = fastvlm.nn.from_module(m)
    x = input_for("llava", m)
    expected = m(x)

    fused.linear_1 = LoraLike(m.linear_1)
    with fastvlm.trace() as t:
        out = fused(x)
    assert torch.allclose(out, expected) and "linear_1 is LoraLike" in str(t)
    fused.linear_1 = m.linear_1

    fused.act = nn.Tanh()
    with fastvlm.trace() as t:
        fused(x)
    assert "activation Tanh has no fused kernel" in str(t)
    fused.act = m.act

    h = m.linear_2.register_forward_hook(lambda *a: None)
    with fastvlm.trace() as t:
        fused(x)
    assert "linear_2 has forward hooks" in str(t)
    h.remove()

    monkeypatch.setenv("FASTVLM_STRICT", "1")
    fused.act = nn.Tanh()
    with pytest.raises(fastvlm.FastVLMFallbackError, match="activation Tanh"):
        fused(x)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_full_size_parity_pytorch_path(family, torch_backend):
    """Real sizes on the PyTorch path: LLaVA-1.5-7B (1024->4096->4096, 576 tokens), Qwen2-VL-7B merger (1024 patches
    of 1280 -> 5120 -> 3584)."""
    import transformers

    torch.manual_seed(0)
    if family == "llava":
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        m = LlavaMultiModalProjector(transformers.LlavaConfig())
        x = torch.randn(1, 576, 1024)
    else:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

        m = PatchMerger(dim=3584, context_dim=1280)
        x = torch.randn(1024, 1280)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
        fused = fastvlm.nn.from_module(m)
        out = fused(x)
        ref = m(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_internvl_shuffle_projector(backend, monkeypatch):
    """The fused shuffle + projector equals InternVL's get_image_features lines (pixel_shuffle, then the projector)."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    proj = build("internvl")
    B, side, C = 2, 4, proj.linear_1.in_features // 4
    feats = torch.randn(B, side * side, C)
    with torch.no_grad():
        shuffled = InternVLModel.pixel_shuffle(None, feats.reshape(B, side, side, C), scale_factor=0.5)
        ref = proj.double()(shuffled.reshape(B, -1, 4 * C).double())
        fused = fastvlm.nn.InternVLShuffleProjector.from_projector(proj.float(), 0.5)
        out = fused(feats)
    assert out.shape == ref.shape
    assert_close(out, ref, torch.float32, 4 * C, roundings=3)
    assert fused.projector.linear_1.weight is proj.linear_1.weight
