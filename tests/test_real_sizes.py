"""The merge and pooling connectors at the sizes of real checkpoints, on the PyTorch path (CPU, fp32).

The fused modules run their row tables (pixel shuffle, unfold merge, pooling) through fastvlm's op; the originals run
transformers' code. Sizes: Gemma 3-4B (64 x 64 SigLIP grid pooled to 16 x 16, 1152 -> 2560), Idefics3-8B (17 crops of
26 x 26 patches, scale 2, 4608 -> 4096), InternVL3-8B (7 tiles of 32 x 32, pixel shuffle 0.5, 4096 -> 3584 -> 3584)
and Mistral-Small-3.1 (one 1540 x 1540 image: 12100 patches of 1024, 2 x 2 merge, 1024 -> 5120 -> 5120).
The Idefics2-8B Perceiver at 729 and 4900 context tokens is in tests/test_perceiver.py.
"""
import pytest
import torch

import fastvlm
from fastvlm.testing import _cfg, _mod, randomize_
from helpers import assert_close

SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=1,
                     num_attention_heads=16, patch_size=14)


def _compare(module, args, k, roundings=3, ops=("fastvlm::mlp_projector",)):
    """fp32 fused vs the original module in float64 (a copy), tolerance from fp32 and the reduction length k.

    ``ops`` is the exact sequence of fastvlm ops the fused module must record (none of them a fallback)."""
    module = randomize_(module.eval(), std=0.02)
    fused = fastvlm.nn.from_module(module)
    with torch.no_grad(), fastvlm.trace() as t:
        out = fused(*args)
    assert [r.op for r in t.records] == list(ops), str(t)  # the fused ops ran, nothing else
    with torch.no_grad():
        ref = module.double()(*[a.double() if a.is_floating_point() else a for a in args])
    module.float()
    assert out.shape == ref.shape
    assert_close(out, ref, torch.float32, k, roundings=roundings)


def test_gemma3_4b(torch_backend):
    m = _mod("gemma3.modeling_gemma3", "Gemma3MultiModalProjector")(_cfg(
        "Gemma3Config", vision_config=dict(SIGLIP_SO400M, image_size=896),
        text_config=dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=100),
        mm_tokens_per_image=256))
    _compare(m, (torch.randn(2, 4096, 1152),), 1152 * 16)


def test_idefics3_8b_17_crops(torch_backend):
    m = _mod("idefics3.modeling_idefics3", "Idefics3Connector")(_cfg(
        "Idefics3Config", vision_config=dict(SIGLIP_SO400M, model_type="idefics3_vision", image_size=364),
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=100), scale_factor=2))
    _compare(m, (torch.randn(17, 676, 1152),), 4608)


def test_internvl3_8b_7_tiles(torch_backend):
    from transformers.models.internvl.modeling_internvl import InternVLModel

    proj = _mod("internvl.modeling_internvl", "InternVLMultiModalProjector")(_cfg(
        "InternVLConfig", vision_config=dict(model_type="internvl_vision", hidden_size=1024, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=16),
        text_config=dict(model_type="qwen2", hidden_size=3584, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=28, num_key_value_heads=4, vocab_size=100)))
    proj = randomize_(proj.eval(), std=0.02)
    feats = torch.randn(7, 1024, 1024)
    fused = fastvlm.nn.InternVLShuffleProjector.from_projector(proj, 0.5)
    with torch.no_grad():
        out = fused(feats)
        shuffled = InternVLModel.pixel_shuffle(None, feats.double().reshape(7, 32, 32, 1024), scale_factor=0.5)
        ref = proj.double()(shuffled.reshape(7, -1, 4096))
    assert out.shape == ref.shape == (7, 256, 3584)
    assert_close(out, ref, torch.float32, 4096, roundings=3)


@pytest.mark.parametrize("sizes", [[[1540, 1540]], [[1540, 980], [420, 700]]], ids=["12100_patches", "ragged"])
def test_mistral_small_3_1(sizes, torch_backend):
    m = _mod("mistral3.modeling_mistral3", "Mistral3MultiModalProjector")(_cfg(
        "Mistral3Config", vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=64,
                                             num_attention_heads=16, num_hidden_layers=1, patch_size=14,
                                             image_size=1540, head_dim=64),
        text_config=dict(model_type="mistral", hidden_size=5120, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=100),
        spatial_merge_size=2))
    patches = sum((h // 14) * (w // 14) for h, w in sizes)
    # two fused calls: the 2 x 2 merge (a GEMM over 4 gathered rows, after the RMSNorm) and the Linear-GELU-Linear
    _compare(m, (torch.randn(patches, 1024), torch.tensor(sizes)), 5120,
             ops=("fastvlm::mlp_projector", "fastvlm::mlp_projector"))
