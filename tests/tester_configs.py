"""Small configurations as transformers' own model tests build them (tests/models/<name>/test_modeling_<name>.py,
the *ModelTester defaults), reconstructed as data: transformers' test suite is not installed with the package.

``build(name)`` returns ``(model, inputs)``: the eval-mode fp32 CPU model with random weights and inputs for its
forward (pixels as its processor lays them out, and the matching number of image tokens). Sizes that transformers'
testers vary are kept as they are there: Qwen-VL spatial_merge_size 1 as well as 2, LFM2-VL's downsample 4 over an
8 x 8 grid, Qwen3-VL's patch 16 with num_position_embeddings 16.
"""
from __future__ import annotations

import copy

import torch
import transformers

_QWEN_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                  hidden_act="silu", tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1]))
_QWEN_IDS = dict(image_token_id=3, video_token_id=4, vision_start_token_id=5, vision_end_token_id=6)
_QWEN3_TEXT = dict(_QWEN_TEXT, head_dim=8, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                mrope_section=[2, 1, 1], mrope_interleaved=True))
_QWEN3_VISION = dict(depth=2, hidden_size=32, intermediate_size=32, out_hidden_size=32, num_heads=4, patch_size=16,
                     spatial_merge_size=1, temporal_patch_size=2, num_position_embeddings=16, in_channels=3,
                     hidden_act="gelu_pytorch_tanh", deepstack_visual_indexes=[1])

_GLM_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, hidden_act="silu",
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                                      partial_rotary_factor=1.0))
_GLM_IDS = dict(image_token_id=3, video_token_id=4, image_start_token_id=5, image_end_token_id=6,
                video_start_token_id=7, video_end_token_id=8)
_GLM_VISION = dict(depth=2, hidden_size=32, hidden_act="silu", num_heads=4, in_channels=3, image_size=28,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                   intermediate_size=22)

# name: (transformers class prefix, config kwargs, inputs: ("qwen", image side) | ("lfm2", grid side))
CONFIGS = {
    # Qwen2VLVisionText2TextModelTester: vision depth 2, embed 32, mlp_ratio 4, heads 4, patch 14, merge 2
    "qwen2_vl": ("Qwen2VL", dict(
        text_config=_QWEN_TEXT, vision_config=dict(depth=2, embed_dim=32, hidden_size=32, hidden_act="quick_gelu",
                                                   mlp_ratio=4, num_heads=4, patch_size=14, spatial_merge_size=2,
                                                   temporal_patch_size=2), **_QWEN_IDS), ("qwen", 28)),
    # the same with spatial_merge_size 1, as the later testers use
    "qwen2_vl_merge1": ("Qwen2VL", dict(
        text_config=_QWEN_TEXT, vision_config=dict(depth=2, embed_dim=32, hidden_size=32, hidden_act="quick_gelu",
                                                   mlp_ratio=4, num_heads=4, patch_size=14, spatial_merge_size=1,
                                                   temporal_patch_size=2), **_QWEN_IDS), ("qwen", 28)),
    # Qwen2_5_VLVisionText2TextModelTester: hidden 32, intermediate 32, out 32, heads 4, patch 14, merge 1
    "qwen2_5_vl": ("Qwen2_5_VL", dict(
        text_config=_QWEN_TEXT, vision_config=dict(depth=2, in_chans=3, hidden_act="silu", intermediate_size=32,
                                                   out_hidden_size=32, hidden_size=32, num_heads=4, patch_size=14,
                                                   spatial_merge_size=1, temporal_patch_size=2,
                                                   fullatt_block_indexes=[1], window_size=28),
        **_QWEN_IDS), ("qwen", 28)),
    # Qwen3VL testers: patch 16, merge 1, 16 position embeddings, one deepstack merger
    "qwen3_vl": ("Qwen3VL", dict(text_config=_QWEN3_TEXT, vision_config=_QWEN3_VISION, **_QWEN_IDS),
                 ("qwen", 32)),
    "qwen3_vl_moe": ("Qwen3VLMoe", dict(
        text_config=dict(_QWEN3_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         decoder_sparse_step=1), vision_config=_QWEN3_VISION, **_QWEN_IDS), ("qwen", 32)),
    # Lfm2VlModelTester: SigLIP2 NaFlex tower (patch 4, 16 patches), downsample 4, an 8 x 8 grid per image
    "lfm2_vl": ("Lfm2Vl", dict(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           num_channels=3, num_patches=16, patch_size=4, hidden_act="gelu_pytorch_tanh",
                           layer_norm_eps=1e-6),
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=100, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, rope_theta=1000000.0,
                         conv_bias=False, conv_L_cache=3, block_multiple_of=2, full_attn_idxs=[0]),
        image_token_id=4, downsample_factor=4, projector_hidden_size=32), ("lfm2", 8)),
    # Glm4vVisionText2TextModelTester's shape: patch 14, merge 2 (and 1), a SwiGLU merger of odd width 22
    "glm4v": ("Glm4v", dict(text_config=_GLM_TEXT, vision_config=_GLM_VISION, **_GLM_IDS), ("glm", 28)),
    "glm4v_merge1": ("Glm4v", dict(text_config=_GLM_TEXT, vision_config=dict(_GLM_VISION, spatial_merge_size=1),
                                   **_GLM_IDS), ("glm", 28)),
}


def _qwen_inputs(cfg, side):
    vc = cfg.vision_config
    g, m = side // vc.patch_size, vc.spatial_merge_size
    pixels = torch.randn(g * g, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2)
    n_img = g * g // (m * m)
    ids = [0, cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id] + [10, 11, 12, 13]
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels,
            "image_grid_thw": torch.tensor([[1, g, g]]), "mm_token_type_ids": (input_ids == cfg.image_token_id).long()}


def _lfm2_inputs(cfg, side):
    p = cfg.vision_config.patch_size
    n_img = (side // cfg.downsample_factor) ** 2
    input_ids = torch.tensor([[1, 10, 11] + [cfg.image_token_id] * n_img + [12, 13]])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(1, side * side, 3 * p * p),
            "spatial_shapes": torch.tensor([[side, side]]),
            "pixel_attention_mask": torch.ones(1, side * side, dtype=torch.long)}


def build(name, seed=0):
    prefix, kwargs, (kind, side) = CONFIGS[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, prefix + "Config")(**copy.deepcopy(kwargs))
    model = getattr(transformers, prefix + "ForConditionalGeneration")(cfg).float().eval()
    with torch.no_grad():  # transformers' init leaves norms at 1 and some biases at 0: make every path count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if kind == "glm":  # Qwen-VL's inputs under GLM's token names
        cfg.vision_start_token_id, cfg.vision_end_token_id = cfg.image_start_token_id, cfg.image_end_token_id
    inputs = (_lfm2_inputs if kind == "lfm2" else _qwen_inputs)(cfg, side)
    return model, inputs
