"""fastvlm.patch / unpatch / apply_to_transformers on tiny random models of every family whose kernels exist."""
import tempfile

import pytest
import torch

import fastvlm
from fastvlm.integrations.transformers import NOT_YET
from fastvlm.testing import rel_err
from fastvlm.tiny_models import FAMILIES, build_tiny_model, projector_paths


pytestmark = pytest.mark.usefixtures("quiet_fallbacks")  # fallback warnings are asserted through trace()


def _run(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return logits, tokens


def _check_family(family):
    model, inputs = build_tiny_model(family)
    logits, tokens = _run(model, inputs)
    sd = {k: v.data_ptr() for k, v in model.state_dict().items()}
    connectors = {p: model.get_submodule(p) for p in projector_paths(family) if p != "query_tokens"}
    planned = {p for p, m in connectors.items() if type(m).__name__ in NOT_YET}
    originals = {p: m for p, m in connectors.items() if p not in planned}

    report = fastvlm.patch(model, verify=True)
    patched = {e.path for e in report.patched}
    assert set(originals) <= patched, str(report)
    for p in planned:  # recognised, reported with the reason, left as is
        assert [e.status for e in report.entries if e.path == p] == ["not swapped"], str(report)
    # every swapped module verified on a probe; the hand-off (an exact row copy) is checked in tests/test_handoff.py
    assert all("ok" in e.detail for e in report.patched if e.fused != "hand-off"), str(report)
    with fastvlm.trace() as t:
        logits2, tokens2 = _run(model, inputs)
    if originals:
        # fast_vlm's projector reads the tower's map view through fastvlm::feature_map_projector
        assert {"fastvlm::mlp_projector", "fastvlm::feature_map_projector"} & {r.op for r in t.records}, str(t)
    assert rel_err(logits2, logits) < 1e-5
    assert torch.equal(tokens2, tokens)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == sd  # same keys, same tensors

    assert fastvlm.unpatch(model) == len(patched)
    for p, mod in originals.items():
        assert model.get_submodule(p) is mod


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_pytorch_path(family, torch_backend):
    _check_family(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_triton_interpreter_path(family, triton_backend):
    _check_family(family)


def test_report_lists_what_is_not_swapped(torch_backend):
    model, _ = build_tiny_model("blip2")
    report = fastvlm.patch(model)
    text = str(report)
    assert "Blip2QFormerModel" in text and "FusedBlip2QFormerModel" in text  # fused since issue 4 (was NOT_YET)
    assert "language_projection" in text and "FusedLinear" in text
    model, _ = build_tiny_model("llava")
    report = fastvlm.patch(model, ops={"qwen2_vl"})
    assert not report.patched and any(e.status == "skipped" for e in report.entries)


def test_patch_is_idempotent_and_reports_already_fused(torch_backend):
    model, _ = build_tiny_model("llava")
    first = fastvlm.patch(model)
    assert {e.path for e in first.patched} == {"model.multi_modal_projector", "model.vision_tower.embeddings",
                                               "model.vision_tower.pre_layrnorm",  # CLIP's pre-norm, paired
                                               "model"}  # the hand-off into inputs_embeds
    report = fastvlm.patch(model)
    assert [e.status for e in report.entries if e.path == "model.multi_modal_projector"] == ["already fused"]
    assert [e.status for e in report.entries if e.path == "model.vision_tower.pre_layrnorm"] == ["already fused"]
    assert [e.status for e in report.entries if e.path == "model"] == ["already fused"]
    assert fastvlm.unpatch(model) == 4


def test_class_level_apply_and_revert(torch_backend):
    from transformers.models.llava import modeling_llava
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    before = (modeling_llava.LlavaMultiModalProjector, modeling_qwen2_vl.PatchMerger, torch.nn.Linear,
              torch.nn.functional.gelu)
    ref_model, inputs = build_tiny_model("llava")
    ref_logits, _ = _run(ref_model, inputs)
    try:
        replaced = fastvlm.apply_to_transformers()
        assert "LlavaMultiModalProjector" in replaced
        model, inputs = build_tiny_model("llava")  # constructed through the class: fused from the start
        assert isinstance(model.model.multi_modal_projector, fastvlm.nn.FusedLlavaMultiModalProjector)
        logits, _ = _run(model, inputs)
        assert rel_err(logits, ref_logits) < 1e-5
        with tempfile.TemporaryDirectory() as d:  # the from_pretrained route
            ref_model.save_pretrained(d)
            loaded = type(ref_model).from_pretrained(d)
            assert isinstance(loaded.model.multi_modal_projector, fastvlm.nn.FusedLlavaMultiModalProjector)
    finally:
        fastvlm.revert_transformers()
    after = (modeling_llava.LlavaMultiModalProjector, modeling_qwen2_vl.PatchMerger, torch.nn.Linear,
             torch.nn.functional.gelu)
    assert after == before
    model, _ = build_tiny_model("llava")
    assert type(model.model.multi_modal_projector) is before[0]


def test_save_pretrained_round_trip(torch_backend):
    model, inputs = build_tiny_model("qwen2_vl")
    fastvlm.patch(model)
    logits, _ = _run(model, inputs)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        plain = type(model).from_pretrained(d)  # an unpatched model loads the patched model's checkpoint
    for (k, v), (k2, v2) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with torch.no_grad():
        assert rel_err(plain(**inputs).logits, logits) < 1e-5


def test_meta_device_then_load(torch_backend):
    accelerate = pytest.importorskip("accelerate")
    model, inputs = build_tiny_model("llava")
    with accelerate.init_empty_weights():  # parameters on the meta device, buffers real (as from_pretrained does)
        meta_model = type(model)(model.config)
    report = fastvlm.patch(meta_model, verify=True)
    assert "meta device" in report.patched[0].detail
    meta_model.load_state_dict(model.state_dict(), assign=True)
    meta_model.eval()
    with torch.no_grad():
        assert rel_err(meta_model(**inputs).logits, model(**inputs).logits) < 1e-5
    assert isinstance(meta_model.model.multi_modal_projector, fastvlm.nn.FusedLlavaMultiModalProjector)


def test_patch_after_first_forward_and_gradient_checkpointing(torch_backend):
    model, inputs = build_tiny_model("llava")  # vision_feature_layer -2 goes through output-capturing hooks
    ref = model(**inputs).logits.detach()
    fastvlm.patch(model)
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, ref) < 1e-5
    model.train()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model(**inputs).logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "multi_modal_projector" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_device_map_placement(torch_backend):
    pytest.importorskip("accelerate")
    model, inputs = build_tiny_model("llava")
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        placed = type(model).from_pretrained(d, device_map={"": "cpu"})
    fastvlm.patch(placed)
    with torch.no_grad(), fastvlm.trace() as t:
        out = placed(**inputs).logits
    assert "fastvlm::mlp_projector" in {r.op for r in t.records}
    with torch.no_grad():
        assert rel_err(out, model(**inputs).logits) < 1e-5


def test_compile_whole_patched_model(torch_backend):
    model, inputs = build_tiny_model("qwen2_vl")
    ref = model(**inputs).logits.detach()
    fastvlm.patch(model)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(**inputs).logits, ref) < 1e-5


def test_patch_given_a_recognised_module_itself(torch_backend):
    """``fastvlm.patch(projector)`` on a bare recognised module cannot swap it in place (it used to set an attribute
    named "" on it): a ValueError that names fastvlm.nn.from_module, which gives the replacement; nothing changes.
    A model that holds the module is patched as before; an already fused module is reported as such."""
    from fastvlm.testing import build

    proj = build("llava").eval()
    children = dict(proj.named_children())
    with pytest.raises(ValueError, match=r"fastvlm\.nn\.from_module"):
        fastvlm.patch(proj)
    assert "" not in proj._modules and "" not in proj.__dict__ and dict(proj.named_children()) == children
    assert fastvlm.patch(proj, ops={"qwen2_vl"}).entries[0].status == "skipped"  # not selected: nothing to refuse
    fused = fastvlm.nn.from_module(proj)
    x = torch.randn(3, proj.linear_1.in_features)
    with torch.no_grad():
        assert rel_err(fused(x), proj(x)) < 1e-5
    assert [e.status for e in fastvlm.patch(fused).entries] == ["already fused"]
    holder = torch.nn.Module()
    holder.proj = proj
    assert [e.path for e in fastvlm.patch(holder).patched] == ["proj"]
