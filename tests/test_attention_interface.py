"""The attention kernel selected through transformers' AttentionInterface for the Q-Former sub-config only."""
import warnings

import pytest
import torch

import fastvlm
from fastvlm.testing import rel_err
from fastvlm.tiny_models import build_tiny_model


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_qformer_through_attention_interface(family, backend, monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    warnings.simplefilter("ignore", fastvlm.FastVLMFallbackWarning)
    model, inputs = build_tiny_model(family)
    with torch.no_grad():
        ref = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    name = fastvlm.register_attention()
    text_impl = model.language_model.config._attn_implementation
    model.set_attn_implementation({"qformer_config": name})
    assert model.qformer.config._attn_implementation == name
    assert model.language_model.config._attn_implementation == text_impl  # only the Q-Former switched
    with torch.no_grad(), fastvlm.trace() as t:
        out = model(**inputs).logits
        tokens2 = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert {r.op for r in t.records} >= {"fastvlm::attention"} and {r.backend for r in t.records} == {backend}
    assert rel_err(out, ref) < 1e-5 and torch.equal(tokens, tokens2)


def test_dropout_in_training_falls_back_with_reason(torch_backend):
    model, inputs = build_tiny_model("blip2")
    model.qformer.config.attention_probs_dropout_prob = 0.1
    for mod in model.qformer.modules():
        if hasattr(mod, "attention_dropout"):
            mod.attention_dropout = 0.1
    model.set_attn_implementation({"qformer_config": fastvlm.register_attention()})
    model.train()
    with fastvlm.trace() as t, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(**inputs)
    assert any("dropout" in " ".join(r.reasons) for r in t.records), str(t)
