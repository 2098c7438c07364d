"""Recognition by structure (issue 15, deliverable 1): modules no class recipe names, fused by what they compute and
confirmed on a probe before the swap; modular copies of recipe classes fused without a code change."""
import copy
import importlib
import math

import pytest
import torch
import torch.nn as nn

import fastvlm
from fastvlm.integrations import behaviour, structure
from fastvlm.testing import rel_err, tolerance
from fastvlm.tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("quiet_fallbacks")


# ------------------------------------------------------------------- synthetic classes defined in this test module

class CopiedLlavaProjector(nn.Module):
    """LlavaMultiModalProjector's code with another name and another constructor, no subclassing."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_out, d_out)

    def forward(self, image_features):
        hidden_states = self.linear_1(image_features)
        hidden_states = self.act(hidden_states)
        hidden_states = self.linear_2(hidden_states)
        return hidden_states


class SequentialAligner(nn.Module):
    """Not a copy of anything: an nn.Sequential readout, as VideoLLaMA 3 writes it."""

    def __init__(self, d_in, d_out, act=None):
        super().__init__()
        self.readout = nn.Sequential(nn.Linear(d_in, d_out), act or nn.SiLU(), nn.Dropout(0.1), nn.Linear(d_out, d_out))

    def forward(self, feats):
        return self.readout(feats)


class ErfGelu(nn.Module):
    """GELU written out: an activation class fastvlm knows only by behaviour."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class PlainRMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(x.dtype)


class OtherCastRMSNorm(PlainRMSNorm):
    """The same fp32 math, but the weight multiplies before the cast: other bf16 results than the kernel's."""

    def forward(self, x):
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.float() * xf).to(x.dtype)


class MergerWithOwnNorm(nn.Module):
    """A Qwen-style merger: a norm per patch, rows of 2 x 2 patches, an MLP."""

    def __init__(self, c, out, norm_cls=PlainRMSNorm, merge=2):
        super().__init__()
        self.width = c * merge * merge
        self.ln = norm_cls(c)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), ErfGelu(), nn.Linear(self.width, out))

    def forward(self, x):
        return self.mlp(self.ln(x).view(-1, self.width))


class ResidualMLP(nn.Module):
    """Linear-act-Linear plus a residual: the MLP candidate does not reproduce it on the probe."""

    def __init__(self, d):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class Holder(nn.Module):
    def __init__(self, **mods):
        super().__init__()
        for k, v in mods.items():
            setattr(self, k, v)


def _randomise(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape == getattr(m, "weight", p).shape
                                                 else 0.0))
    return m


def _patch_and_compare(mod, x, expect):
    """Patch a holder of ``mod``; the report row says ``expect``; the fused forward ran and matches."""
    ref_mod = copy.deepcopy(mod)
    holder = Holder(m=mod)
    report = fastvlm.patch(holder, verify=True)
    rows = [e for e in report.entries if e.path == "m"]
    assert rows and rows[0].status == "patched" and expect in rows[0].detail, str(report)
    assert rows[0].detail.startswith(f"matched by structure: {type(mod).__name__} as"), str(report)
    assert isinstance(holder.m, type(mod)) and type(holder.m) is not type(mod)
    with torch.no_grad(), fastvlm.trace() as t:
        out = holder.m(x)
    assert {"fastvlm::mlp_projector", "fastvlm::rows_embed", "fastvlm::patch_embed"} & {r.op for r in t.records}
    with torch.no_grad():
        ref = ref_mod(x)
    assert out.shape == ref.shape and rel_err(out, ref) <= tolerance(x.dtype, 4 * x.shape[-1], roundings=3)
    assert set(holder.state_dict()) == {"m." + k for k in ref_mod.state_dict()}
    assert fastvlm.unpatch(holder) == 1 and holder.m is mod
    return report


# ------------------------------------------------------------------------------------------------------- tests

def test_copy_of_llava_projector_in_a_llava_model(torch_backend):
    """A subclass-free copy of LlavaMultiModalProjector's code in the model: fused without a code change."""
    model, inputs = build_tiny_model("llava")
    orig = model.model.multi_modal_projector
    copied = CopiedLlavaProjector(orig.linear_1.in_features, orig.linear_1.out_features)
    copied.load_state_dict(orig.state_dict())
    model.model.multi_modal_projector = copied
    with torch.no_grad():
        ref = model(**inputs).logits
    report = fastvlm.patch(model, verify=True)
    row = [e for e in report.entries if e.path == "model.multi_modal_projector"][0]
    assert row.status == "patched" and row.detail.startswith(
        "matched by structure: CopiedLlavaProjector as a copy of llava's LlavaMultiModalProjector"), str(report)
    assert row.detail.endswith("ok")
    with torch.no_grad(), fastvlm.trace() as t:
        out = model(**inputs).logits
    assert "fastvlm::mlp_projector" in {r.op for r in t.records}
    assert rel_err(out, ref) < 1e-5
    fastvlm.unpatch(model)
    assert model.model.multi_modal_projector is copied


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mlp_by_structure_with_dropout_and_known_act(backend, monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    mod = _randomise(SequentialAligner(16, 24)).eval()
    _patch_and_compare(mod, torch.randn(2, 5, 16), "as Linear-SiLU-Linear")


def test_structural_module_is_drop_in(torch_backend):
    """Same signature (keyword calls too), torch.compile(fullgraph=True), the original's gradients."""
    import inspect

    mod = _randomise(MergerWithOwnNorm(8, 12)).eval()
    ref = copy.deepcopy(mod)
    holder = Holder(m=mod)
    fastvlm.patch(holder)
    fused = holder.m
    assert inspect.signature(fused.forward) == inspect.signature(ref.forward)
    x = torch.randn(16, 8)
    bound = tolerance(torch.float32, 4 * 32, roundings=3)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(fused(x=x), ref(x)) <= bound and rel_err(compiled(x), ref(x)) <= bound
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused(xf).square().sum().backward()
    ref(xr).square().sum().backward()
    assert rel_err(xf.grad, xr.grad) <= bound
    for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, q.grad) <= bound, n


def test_activation_and_rmsnorm_known_by_behaviour(torch_backend):
    mod = _randomise(MergerWithOwnNorm(8, 12)).eval()
    assert behaviour.act_kind(ErfGelu()) == "gelu" and behaviour.norm_kind(mod.ln) == "rmsnorm"
    _patch_and_compare(mod, torch.randn(16, 8), "PlainRMSNorm per patch, 2x2 merge, Linear-ErfGelu-Linear")


def test_rmsnorm_with_other_cast_points_is_not_taken(torch_backend):
    assert behaviour.norm_kind(_randomise(OtherCastRMSNorm(16))) is None
    holder = Holder(m=_randomise(MergerWithOwnNorm(8, 12, norm_cls=OtherCastRMSNorm)))
    report = fastvlm.patch(holder, verify=True)
    assert not report.patched and type(holder.m) is MergerWithOwnNorm, str(report)


def test_a_candidate_the_probe_rejects_is_not_swapped(torch_backend):
    holder = Holder(m=_randomise(ResidualMLP(16)))
    report = fastvlm.patch(holder, verify=True)
    assert not report.entries and type(holder.m) is ResidualMLP, str(report)


def test_dropout_in_training_runs_the_original(torch_backend):
    holder = Holder(m=_randomise(SequentialAligner(16, 24)).eval())
    fastvlm.patch(holder)
    holder.train()
    with fastvlm.trace() as t:
        holder.m(torch.randn(2, 5, 16))
    assert any("dropout is active" in r for rec in t.records for r in rec.reasons), str(t)


def test_block_mlps_are_left_alone(torch_backend):
    """Linear-act-Linear inside a transformer block is the block's own MLP: never recognised."""
    model, _ = build_tiny_model("llava")
    report = fastvlm.patch(model, structure=True)
    assert not [e for e in report.entries if ".layers." in e.path or "structure" in e.detail], str(report)
    assert not any(p.startswith("model.vision_tower.vision_model.encoder.layers.0.")
                   for p in structure.eligible_paths(model))


def test_structure_can_be_turned_off_and_selected_by_ops(torch_backend):
    holder = Holder(m=_randomise(SequentialAligner(16, 24)).eval())
    assert not fastvlm.patch(holder, structure=False).entries
    report = fastvlm.patch(holder, ops={"llava"})
    assert [e.status for e in report.entries] == ["skipped"]
    assert [e.status for e in fastvlm.patch(holder, ops={"structure"}).entries] == ["patched"]


# ------------------------------------------------------------------- real group-A classes of transformers 5.24

def _cls(path):
    mod, name = path.rsplit(".", 1)
    try:
        return getattr(importlib.import_module("transformers.models." + mod), name)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"transformers has no {path}: {exc}")


def _cfg(name, **kw):
    import transformers

    return getattr(transformers, name)(**kw)


V = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
         patch_size=14)


def _real_cases():
    return {
        "qwen2_5_omni merger (copy of Qwen2-VL's)": lambda: (
            _cls("qwen2_5_omni.modeling_qwen2_5_omni.Qwen2_5OmniPatchMerger")(dim=24, context_dim=8),
            torch.randn(16, 8), "a copy of qwen2_vl's PatchMerger"),
        "qwen2_5_omni patch embed (copy)": lambda: (
            _cls("qwen2_5_omni.modeling_qwen2_5_omni.Qwen2_5_VisionPatchEmbed")(patch_size=4, embed_dim=16),
            torch.randn(6, 3 * 2 * 4 * 4), "a copy of qwen2_vl's PatchEmbed"),
        "exaone4_5 merger (copy)": lambda: (
            _cls("exaone4_5.modeling_exaone4_5.Exaone4_5_PatchMerger")(dim=24, context_dim=8),
            torch.randn(16, 8), "a copy of qwen2_vl's PatchMerger"),
        "video_llama_3 projector": lambda: (
            _cls("video_llama_3.modeling_video_llama_3.VideoLlama3Projector")(_cfg(
                "VideoLlama3Config", vision_config=dict(hidden_size=16),
                text_config=dict(model_type="qwen2", hidden_size=24))),
            torch.randn(7, 16), "as Linear-GELU-Linear"),
        "janus aligner": lambda: (
            _cls("janus.modeling_janus.JanusVisionAlignerMLP")(_cfg(
                "JanusVisionConfig", hidden_size=16, projection_dim=24, depth=2)),
            torch.randn(2, 5, 16), "as Linear-GELUActivation-Linear"),
        "deepseek_vl aligner": lambda: (
            _cls("deepseek_vl.modeling_deepseek_vl.DeepseekVLAligner")(_cfg(
                "DeepseekVLConfig", vision_config=dict(model_type="siglip_vision_model", hidden_size=16),
                text_config=dict(model_type="llama", hidden_size=32))),
            torch.randn(2, 5, 16), "as Linear-GELU-Linear"),
        "git embeddings (copy of CLIP's)": lambda: (
            _cls("git.modeling_git.GitVisionEmbeddings")(_cfg("GitVisionConfig", **V)),
            torch.randn(2, 3, 28, 28), "a copy of clip's CLIPVisionEmbeddings"),
        "kosmos-2 embeddings (copy of CLIP's)": lambda: (
            _cls("kosmos2.modeling_kosmos2.Kosmos2VisionEmbeddings")(_cfg("Kosmos2VisionConfig", **V)),
            torch.randn(2, 3, 28, 28), "a copy of clip's CLIPVisionEmbeddings"),
        "janus embeddings (conv + positions)": lambda: (
            _cls("janus.modeling_janus.JanusVisionEmbeddings")(_cfg("JanusVisionConfig", **V)),
            torch.randn(2, 3, 28, 28), "as Conv2d patch embedding + whole position table"),
    }


@pytest.mark.parametrize("case", list(_real_cases()))
def test_real_group_a_classes(case, torch_backend):
    mod, x, expect = _real_cases()[case]()
    _randomise(mod).eval()
    _patch_and_compare(mod, x, expect)


def test_deepseek_vl_model_end_to_end(torch_backend):
    import transformers

    T = dict(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2)
    cfg = transformers.DeepseekVLConfig(vision_config=dict(model_type="siglip_vision_model", **V),
                                        text_config=dict(model_type="llama", **T), image_token_id=99)
    model = transformers.DeepseekVLForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[1, 5] + [99] * 4 + [6, 7]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 28, 28))
    with torch.no_grad():
        ref = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    report = fastvlm.patch(model, verify=True)
    row = [e for e in report.entries if e.path == "model.aligner"][0]
    assert row.status == "patched" and "matched by structure: DeepseekVLAligner" in row.detail, str(report)
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, ref) < 1e-5
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), tokens)
