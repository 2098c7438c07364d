"""``fastvlm.patch(verify=True)`` never raises, probes come from each module's own sizes, ``patch`` is atomic, and
fused patch embeddings floor the grid as the original convolution does (issue 15, deliverable 3)."""
import pytest
import torch

import fastvlm
from fastvlm.integrations import handoff, verify
from fastvlm.testing import rel_err, tolerance
from fastvlm.tiny_models import build_tiny_model

import tester_configs

pytestmark = pytest.mark.usefixtures("quiet_fallbacks")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", list(tester_configs.CONFIGS))
def test_transformers_tester_configs_patch_and_verify(name, torch_backend):
    """Qwen-VL with spatial_merge_size 1 and 2, Qwen3-VL patch 16, LFM2-VL's [B, H, W, C] grid: transformers' own
    small configurations patch with verify=True, every swap verified on its probe, logits unchanged."""
    model, inputs = tester_configs.build(name)
    ref = _logits(model, inputs)
    other = dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]))
    assert rel_err(_logits(model, other), ref) > 1e-3  # the image reaches the logits
    report = fastvlm.patch(model, verify=True)
    swapped = [e for e in report.patched if e.fused != "hand-off"]
    assert swapped, str(report)
    assert all(("verify: rel err" in e.detail or e.detail.startswith("interpolated")) and e.detail.endswith("ok")
               for e in swapped), str(report)  # (a module matched by structure says so first)
    assert not report.not_swapped or all("hand-off" in e.detail for e in report.not_swapped), str(report)
    out = _logits(model, inputs)
    assert rel_err(out, ref) <= tolerance(torch.float32, 4 * 32, roundings=3)
    fastvlm.unpatch(model)
    assert torch.equal(_logits(model, inputs), ref)


@pytest.mark.parametrize("name", ["qwen2_vl_merge1", "lfm2_vl"])
def test_tester_configs_on_the_kernels(name, triton_backend):
    """The same with the Triton kernels (the interpreter on CPU): verify clean, logits unchanged."""
    model, inputs = tester_configs.build(name)
    ref = _logits(model, inputs)
    report = fastvlm.patch(model, verify=True)
    assert all(e.detail.endswith("ok") for e in report.patched if e.fused != "hand-off"), str(report)
    with fastvlm.trace() as t:
        out = _logits(model, inputs)
    assert "triton" in t.backends(), str(t)
    assert rel_err(out, ref) <= tolerance(torch.float32, 4 * 32, roundings=3)


@pytest.mark.parametrize("merge", [1, 2, 3])
@pytest.mark.parametrize("cls", ["qwen2_vl.modeling_qwen2_vl.PatchMerger",
                                 "qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLPatchMerger"])
def test_merger_probe_follows_spatial_merge_size(cls, merge, torch_backend):
    import importlib

    mod, name = cls.rsplit(".", 1)
    Merger = getattr(importlib.import_module("transformers.models." + mod), name)
    m = Merger(dim=24, context_dim=8, spatial_merge_size=merge)
    fused = fastvlm.nn.from_module(m)
    probe = verify.build_probe(fused._fastvlm_recipe, fused)
    assert probe[0].shape[1] == 8 and (probe[0].shape[0] * 8) % (8 * merge * merge) == 0
    ok, detail = verify.verify(m, fused, fused._fastvlm_recipe)
    assert ok is True, detail


@pytest.mark.parametrize("post", [False, True])
def test_qwen3_merger_probe_pre_and_post_shuffle_norm(post, torch_backend):
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchMerger

    cfg = Qwen3VLVisionConfig(hidden_size=16, out_hidden_size=24, spatial_merge_size=1 if post else 2)
    m = Qwen3VLVisionPatchMerger(cfg, use_postshuffle_norm=post)
    fused = fastvlm.nn.from_module(m)
    ok, detail = verify.verify(m, fused, fused._fastvlm_recipe)
    assert ok is True, detail


def test_a_probe_that_cannot_be_built_is_reported(monkeypatch, torch_backend):
    model, _ = build_tiny_model("llava")

    def no_probe(recipe, fused):
        raise verify.ProbeUnavailable("nothing records the input width")

    monkeypatch.setattr(verify, "build_probe", no_probe)
    report = fastvlm.patch(model, verify=True)
    proj = [e for e in report.entries if e.path == "model.multi_modal_projector"]
    assert proj[0].status == "patched" and proj[0].detail == "not verified: nothing records the input width"
    pre = [e for e in report.entries if e.path == "model.vision_tower.pre_layrnorm"]  # the pairing's probe, too
    assert pre[0].status == "patched" and pre[0].detail.endswith("not verified: ProbeUnavailable: nothing records "
                                                                 "the input width"), str(report)


def test_original_rejecting_the_probe_is_not_verified(torch_backend):
    model, inputs = build_tiny_model("llava")
    ref = _logits(model, inputs)
    proj = model.model.multi_modal_projector

    def reject_probe(module, args):
        if args[0].shape[0] == 2 and args[0].shape[1] == 5:  # the probe's [2, 5, width], not the model's inputs
            raise ValueError("this projector takes one image at a time")

    proj.register_forward_pre_hook(reject_probe)
    report = fastvlm.patch(model, verify=True)
    row = [e for e in report.entries if e.path == "model.multi_modal_projector"][0]
    assert row.detail.startswith("not verified: the original rejects the probe (ValueError"), str(report)
    assert rel_err(_logits(model, inputs), ref) < 1e-5


@pytest.mark.parametrize("fault", ["raises", "wrong"])
def test_fused_module_failing_its_probe_is_not_swapped(fault, monkeypatch, torch_backend):
    import fastvlm.nn.projector as projector

    model, inputs = build_tiny_model("llava")
    ref = _logits(model, inputs)
    original = model.model.multi_modal_projector
    real = projector.mlp_projector

    def faulty(x, *args, **kwargs):
        if fault == "raises":
            raise RuntimeError("injected kernel failure")
        return real(x, *args, **kwargs) * 1.01

    monkeypatch.setattr(projector, "mlp_projector", faulty)
    report = fastvlm.patch(model, verify=True)
    row = [e for e in report.entries if e.path == "model.multi_modal_projector"][0]
    assert row.status == "not swapped" and "the original is kept" in row.detail, str(report)
    assert ("RuntimeError: injected kernel failure" in row.detail) == (fault == "raises")
    assert model.model.multi_modal_projector is original
    monkeypatch.setattr(projector, "mlp_projector", real)
    assert rel_err(_logits(model, inputs), ref) < 1e-5


def _fastvlm_state(model):
    """Every trace patch leaves: swapped classes, instance attributes it sets, its bookkeeping on the model."""
    types = [(n, type(m)) for n, m in model.named_modules()]
    inst = [(n, k) for n, m in model.named_modules() for k in m.__dict__
            if k.startswith("_fastvlm") or k in ("forward", "_pos_embed", "get_image_features")]
    return types, inst, sorted(k for k in model.__dict__ if k.startswith("_fastvlm"))


@pytest.mark.parametrize("where", ["handoff", "pairing", "second_swap"])
def test_patch_is_atomic(where, monkeypatch, torch_backend):
    """An error anywhere inside patch undoes every swap, pairing and hand-off this call made, then propagates."""
    model, inputs = build_tiny_model("llava")
    ref = _logits(model, inputs)
    before = _fastvlm_state(model)
    if where == "handoff":  # after every module swap and the CLIP pairing
        real_install = handoff.install

        def install(model, selected=lambda family: True):
            real_install(model, selected)
            raise RuntimeError("injected")
        monkeypatch.setattr(handoff, "install", install)
    elif where == "pairing":
        import fastvlm.nn.embed_pairing as ep

        monkeypatch.setattr(ep, "_ArmedEntry", lambda *a: (_ for _ in ()).throw(RuntimeError("injected")))
    else:
        from fastvlm.nn.projector import _FusedProjectorMixin

        monkeypatch.setattr(_FusedProjectorMixin, "_fastvlm_structure",
                            lambda self: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        fastvlm.patch(model, verify=True)
    assert _fastvlm_state(model) == before
    monkeypatch.undo()
    assert torch.equal(_logits(model, inputs), ref)
    report = fastvlm.patch(model, verify=True)  # and a later patch works as on a fresh model
    assert {e.path for e in report.patched} == {"model.multi_modal_projector", "model.vision_tower.embeddings",
                                               "model.vision_tower.pre_layrnorm", "model"}


def test_atomic_rollback_keeps_an_earlier_patch(monkeypatch, torch_backend):
    model, inputs = build_tiny_model("llava")
    first = fastvlm.patch(model, ops={"llava"})  # the projector and the hand-off
    fused = model.model.multi_modal_projector
    before = _fastvlm_state(model)
    real_install = handoff.install

    def install(model, selected=lambda family: True):
        real_install(model, selected)
        raise RuntimeError("injected")
    monkeypatch.setattr(handoff, "install", install)
    with pytest.raises(RuntimeError, match="injected"):
        fastvlm.patch(model)
    assert _fastvlm_state(model) == before and model.model.multi_modal_projector is fused
    monkeypatch.undo()
    assert fastvlm.unpatch(model) == len(first.patched) == 2


# ---------------------------------------------------------------------------- grid flooring of patch embeddings

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kw", [dict(img_size=20, patch_size=14),  # gemma3n's tester: one patch
                                dict(img_size=20, patch_size=14, class_token=False, global_pool="avg"),
                                dict(img_size=30, patch_size=7, dynamic_img_size=True)])
def test_timm_patch_embed_floors_the_grid(kw, backend, monkeypatch):
    timm = pytest.importorskip("timm")
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1, embed_dim=24,
                            num_heads=2, **kw).eval()
    side = kw["img_size"] if not kw.get("dynamic_img_size") else 28
    x = torch.randn(2, 3, side, side + (7 if kw.get("dynamic_img_size") else 0))
    embed = vit.patch_embed
    with torch.no_grad():
        ref_embed, ref = embed(x), vit.forward_features(x)
    fused = fastvlm.nn.from_module(embed)
    with torch.no_grad(), fastvlm.trace() as t:
        got = fused(x)
    assert "fastvlm::patch_embed" in {r.op for r in t.records}
    assert got.shape == ref_embed.shape and rel_err(got, ref_embed) <= tolerance(torch.float32, 3 * 14 * 14)
    report = fastvlm.patch(vit, verify=True)
    assert all(e.detail.endswith("ok") for e in report.patched), str(report)
    with torch.no_grad():
        assert rel_err(vit.forward_features(x), ref) <= tolerance(torch.float32, 3 * 14 * 14, roundings=3)


@pytest.mark.parametrize("which", ["clip", "siglip", "blip_2"])
def test_conv_embeddings_floor_the_grid(which, torch_backend):
    """CLIP / SigLIP / BLIP-2 built for 20 px with patch 14 (one patch): the valid conv drops the remainder."""
    import transformers

    cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=20,
               patch_size=14)
    cls = {"clip": ("CLIPVisionConfig", "clip.modeling_clip.CLIPVisionEmbeddings"),
           "siglip": ("SiglipVisionConfig", "siglip.modeling_siglip.SiglipVisionEmbeddings"),
           "blip_2": ("Blip2VisionConfig", "blip_2.modeling_blip_2.Blip2VisionEmbeddings")}[which]
    import importlib

    mod, name = cls[1].rsplit(".", 1)
    emb = getattr(importlib.import_module("transformers.models." + mod), name)(getattr(transformers, cls[0])(**cfg))
    with torch.no_grad():
        for p in emb.parameters():
            p.normal_()
    x = torch.randn(2, 3, 20, 20)
    fused = fastvlm.nn.from_module(emb)
    with torch.no_grad():
        assert rel_err(fused(x), emb(x)) <= tolerance(torch.float32, 3 * 14 * 14)
    ok, detail = verify.verify(emb, fused, fused._fastvlm_recipe)
    assert ok is True, detail


@pytest.mark.slow
def test_gemma3n_tester_config_patches_without_raising(torch_backend):
    """Gemma3nVision2TextModelTester (a MobileNetV5 tower of ~1e9 parameters: minutes and ~8 GB here)."""
    import transformers

    text = dict(vocab_size=99, vocab_size_per_layer_input=99, hidden_size=16, hidden_size_per_layer_input=16,
                num_hidden_layers=4, num_kv_shared_layers=2, layer_types=["full_attention", "sliding_attention"] * 2,
                num_attention_heads=2, num_key_value_heads=2, altup_num_inputs=2, intermediate_size=21,
                hidden_activation="gelu_pytorch_tanh", max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, activation_sparsity_pattern=None)
    vision = dict(image_size=20, patch_size=5, num_channels=3, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=37)
    cfg = transformers.Gemma3nConfig(text_config=text, vision_config=vision, image_token_index=1, boi_token_index=2,
                                     eoi_token_index=3, mm_tokens_per_image=2)
    model = transformers.Gemma3nForConditionalGeneration(cfg).eval()
    report = fastvlm.patch(model, verify=True)
    assert not [e for e in report.entries if "MISMATCH" in e.detail], str(report)
