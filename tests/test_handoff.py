"""The hand-off inside patched models (fastvlm/integrations/handoff.py): image features scattered straight into
inputs_embeds by fastvlm::scatter_image_features instead of masked_scatter, for the families where that is exact.

With only the hand-off patched (ops={"handoff"}) nothing else changes, so the logits must be bit-identical to the
original model's and generate must give the same tokens.
"""

import pytest
import torch

from transformers import GenerationMixin

import fastvlm
from fastvlm.integrations import handoff
from fastvlm.tiny_models import FAMILIES, build_tiny_model

HANDOFF_FAMILIES = [r.family for r in handoff.RECIPES if r.family in FAMILIES]
# transformers 5.18+ generate encodes the images before the prefill and passes mm_encoder_outputs, not the pixels
_GENERATE_SOURCE = ("mm_encoder_outputs" if hasattr(GenerationMixin, "_prepare_multimodal_encoder_kwargs_for_generation")
                    else "pixel_values")


pytestmark = pytest.mark.usefixtures("quiet_fallbacks")  # fallback warnings are asserted through trace()


def _inner(model):
    return next(m for m in model.modules() if handoff.recipe_for(m) is not None)


def _image_rows(out):
    """The image rows the output reports: transformers 5.24 ``image_outputs``, 5.17 / 5.18 ``image_hidden_states``."""
    if "image_outputs" in out.__dataclass_fields__:
        feats = out.image_outputs.pooler_output
        return torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    return out.image_hidden_states


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return out, tokens


def test_every_recipe_has_a_tiny_model():
    assert len(HANDOFF_FAMILIES) == len(handoff.RECIPES)


@pytest.mark.parametrize("family", HANDOFF_FAMILIES)
def test_handoff_is_exact(family, torch_backend):
    model, inputs = build_tiny_model(family)
    ref, ref_tokens = _outputs(model, inputs)
    report = fastvlm.patch(model, ops={"handoff"})
    inner = _inner(model)
    assert [e.status for e in report.entries if e.fused == "hand-off"] == ["patched"], str(report)
    assert handoff.is_installed(inner)
    with fastvlm.trace() as t, torch.no_grad():
        out = model(**inputs)
    ops = [r.op for r in t.records]
    assert "fastvlm.handoff" in ops and "fastvlm::scatter_image_features" in ops, str(t)
    with fastvlm.trace() as t, torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    ran = [r for r in t.records if r.op == "fastvlm.handoff" and r.backend == "fastvlm"]
    assert len(ran) == 1 and ran[0].detail.endswith(_GENERATE_SOURCE), str(t)  # the prefill; decode steps: text
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(tokens, ref_tokens)
    assert list(out.keys()) == list(ref.keys())
    assert torch.equal(_image_rows(out), _image_rows(ref))
    assert fastvlm.unpatch(model) == 1
    assert not handoff.is_installed(inner) and "forward" not in inner.__dict__ and handoff._KWARGS not in inner.__dict__


def test_handoff_with_fused_modules_on_the_interpreter(triton_backend):
    model, inputs = build_tiny_model("llava")
    ref, _ = _outputs(model, inputs)
    fastvlm.patch(model)
    with fastvlm.trace() as t:
        out, _ = _outputs(model, inputs)
    assert ("fastvlm::scatter_image_features", "triton") in {(r.op, r.backend) for r in t.records}, str(t)
    assert fastvlm.testing.rel_err(out.logits, ref.logits) < 1e-5


def test_falls_through_with_the_reason(torch_backend):
    model, inputs = build_tiny_model("llava")
    fastvlm.patch(model, ops={"handoff"})
    inner = _inner(model)
    embeds = inner.get_input_embeddings()(inputs["input_ids"])
    with fastvlm.trace() as t, torch.no_grad():
        model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    reasons = [r.reasons for r in t.records if r.op == "fastvlm.handoff"]
    assert reasons and "no input_ids (inputs_embeds given)" in reasons[0], str(t)
    with fastvlm.trace() as t, torch.no_grad():  # text only
        model(input_ids=inputs["input_ids"][:, :3])
    assert any("no pixel_values" in " ".join(r.reasons) for r in t.records if r.op == "fastvlm.handoff"), str(t)


@pytest.mark.skipif(_GENERATE_SOURCE != "mm_encoder_outputs", reason="transformers 5.17: no mm_encoder_outputs")
def test_mm_encoder_outputs_forward(torch_backend):
    """Image features encoded beforehand (as generate does from 5.18 on): the same logits, the rows taken from them;
    outside what the hand-off reproduces, the original's forward and error."""
    model, inputs = build_tiny_model("llava")
    pixels = inputs.pop("pixel_values")
    with torch.no_grad():
        encoded = {"image": model.model.get_image_features(pixel_values=pixels, return_dict=True)}
        ref = model(**inputs, mm_encoder_outputs=encoded)
    fastvlm.patch(model, ops={"handoff"})
    with fastvlm.trace() as t, torch.no_grad():
        out = model(**inputs, mm_encoder_outputs=encoded)
    ran = [r for r in t.records if r.op == "fastvlm.handoff" and r.backend == "fastvlm"]
    assert len(ran) == 1 and ran[0].detail.endswith("from mm_encoder_outputs"), str(t)
    assert torch.equal(out.logits, ref.logits) and list(out.keys()) == list(ref.keys())
    assert torch.equal(_image_rows(out), _image_rows(ref))
    if "image_outputs" in out.__dataclass_fields__:  # 5.24: the encoder output itself, as the original returns it
        assert out.image_outputs is encoded["image"]
    with fastvlm.trace() as t, torch.no_grad(), pytest.raises(ValueError, match="pixel_values and mm_encoder_outputs"):
        model(**inputs, pixel_values=pixels, mm_encoder_outputs=encoded)
    assert [r.reasons for r in t.records if r.op == "fastvlm.handoff"] == [
        ("both pixel_values and mm_encoder_outputs given",)], str(t)
    with fastvlm.trace() as t, torch.no_grad():
        out = model(**inputs, mm_encoder_outputs=dict(encoded, video=encoded["image"]))
    assert [r.reasons for r in t.records if r.op == "fastvlm.handoff"] == [("mm_encoder_outputs holds video",)]
    assert torch.equal(out.logits, ref.logits)


def test_token_count_mismatch_raises_like_transformers(torch_backend):
    model, inputs = build_tiny_model("llava")
    token = model.config.image_token_id
    ids = inputs["input_ids"].clone()
    first = (ids == token).nonzero()[0]
    ids[first[0], first[1]] = 0  # one image token fewer than feature rows
    bad = dict(inputs, input_ids=ids)
    with pytest.raises(ValueError, match="Image features and image tokens do not match") as original:
        with torch.no_grad():
            model(**bad)
    fastvlm.patch(model, ops={"handoff"})
    with pytest.raises(ValueError, match="Image features and image tokens do not match") as patched:
        with torch.no_grad():
            model(**bad)
    assert "tokens:" in str(original.value) and "tokens:" in str(patched.value)


def test_not_exact_families_keep_their_forward(torch_backend):
    model, _ = build_tiny_model("qwen2_vl")
    report = fastvlm.patch(model)
    rows = [e for e in report.entries if "hand-off" in e.detail]
    assert [(e.original, e.status) for e in rows] == [("Qwen2VLModel", "not swapped")], str(report)
    assert "rope" in rows[0].detail
    assert not any(handoff.is_installed(m) for m in model.modules())


def test_gradients_flow_through_the_handoff(torch_backend):
    model, inputs = build_tiny_model("llava")
    ref_model, _ = build_tiny_model("llava")
    ref_model.load_state_dict(model.state_dict())
    fastvlm.patch(model, ops={"handoff"})
    grads = []
    for m in (ref_model, model):
        m.train()
        m.zero_grad()
        m(**inputs).logits.float().square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert "model.multi_modal_projector.linear_1.weight" in grads[1]
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-5, atol=1e-7), name
