"""Tiny, randomly initialised HF vision-language models for fast CPU tests.

``build_tiny_model(family, seed)`` returns ``(model, inputs)`` where ``model`` is a
``transformers`` ``*ForConditionalGeneration`` (eval mode, fp32, CPU, random weights)
and ``inputs`` is a dict such that ``model(**inputs).logits`` works and
``model.generate(**inputs, max_new_tokens=8, do_sample=False)`` works.

Everything is built from public config classes; nothing is downloaded.  ``FAMILIES`` is the one list of family
names (transformers' model_type spelling) that ``fastvlm check FAMILY`` and fastvlm.testing's module cases use;
importing this module does not import transformers.  The connector / projector modules (see ``projector_paths``)
are re-randomised with ``randn * 0.5`` after construction so that the image path is never degenerate (HF
initialises e.g. BLIP-2 ``query_tokens`` to zeros).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# ----------------------------------------------------------------------------- ids
PAD, BOS, EOS = 0, 1, 2
IMG, VID, VSTART, VEND = 990, 991, 992, 993  # image / video / vision start / end ids
IMG_BREAK, IMG_END = 994, 995  # Pixtral row break / image end: ordinary text ids the model never inspects
VOCAB = 1000
TEXT_LO, TEXT_HI = 10, 900  # ordinary (non-special) text token ids
N_TEXT = 6  # random text tokens after the image

# ----------------------------------------------------------------------- sub-configs
_IDS = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **_IDS)
_LLAMA = dict(model_type="llama", **_TEXT)
_QWEN2 = dict(model_type="qwen2", **_TEXT)
_GEMMA = dict(model_type="gemma", head_dim=16, **_TEXT)
_OPT = dict(model_type="opt", vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
            num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256, **_IDS)
_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=56, patch_size=14)  # 4x4 = 16 patches
_CLIP = dict(model_type="clip_vision_model", projection_dim=32, **_VIT)  # + CLS token
_SIGLIP = dict(model_type="siglip_vision_model", vision_use_head=False, **_VIT)  # no CLS
_BLIPVIT = dict(_VIT, initializer_range=0.02)  # Blip2VisionConfig default 1e-10 makes the image path constant
_QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=100, max_position_embeddings=64, cross_attention_frequency=1,
                initializer_range=0.15)  # ~1/sqrt(width): with 0.02 the image barely reaches the queries
_ANYRES = dict(image_grid_pinpoints=[[56, 56]])  # base tile + one 56x56 tile
# M-RoPE: head_dim = 64 / 4 = 16 -> mrope_section must sum to 8
_MROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
_QWENVL_IDS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART,
                   vision_end_token_id=VEND)
# Idefics2/3 and SmolVLM: own SigLIP-like vision config class (no model_type), 5-D pixels + pixel_attention_mask
_IDEFICS_VIT = dict(_VIT)
_MISTRAL = dict(model_type="mistral", head_dim=16, sliding_window=None, **_TEXT)
_COHERE2 = dict(model_type="cohere2", **_TEXT)  # Aya Vision text tower
# Gemma3TextConfig is the fixed sub-config class (no model_type); query scale 1/sqrt(head_dim)
_GEMMA3_TEXT = dict(head_dim=16, query_pre_attn_scalar=16, **_TEXT)
_PIXTRAL = dict(model_type="pixtral", **_VIT)  # head_dim 16, 2-D RoPE, 4x4 patch grid
# Llama 4 vision: the adapter pixel-shuffles (ratio 0.5) hidden 32 -> 128 = intermediate_size (fc1's input),
# fc1 -> projector_input_dim, fc2 projector_output_dim -> projector_output_dim, then the projector
# vision_output_dim -> text hidden: all three dims must agree.
_LLAMA4_VIT = dict(_VIT, intermediate_size=128, pixel_shuffle_ratio=0.5, projector_input_dim=64,
                   projector_output_dim=64, vision_output_dim=64)
# moe_layers=[]: every layer a dense MLP of width intermediate_size_mlp (no experts at all)
_LLAMA4_TEXT = dict(_TEXT, head_dim=16, intermediate_size_mlp=128, moe_layers=[], num_local_experts=1)
# FastViT-MCI3 layout (5 stages, 2 attention stages, /64 total stride) shrunk to tiny widths/depths.
_FASTVIT = dict(model_type="timm_wrapper", architecture="fastvit_mci3", hidden_size=64,
                do_pooling=False, model_args=dict(inference_mode=True, layers=(1, 1, 1, 1, 1),
                                                  embed_dims=(16, 16, 32, 32, 64), cls_ratio=1.0))

# ------------------------------------------------------------------------ the table
# cls:      transformers class prefix (<cls>Config, <cls>ForConditionalGeneration)
# config:   config kwargs
# pixels:   "plain" [1,3,S,S] | "anyres" [1,2,3,S,S] + image_sizes | "qwen" patches + image_grid_thw
#           | "5d" [1,1,3,S,S] + pixel_attention_mask [1,1,S,S] (bool) | "sized" [1,3,S,S] + image_sizes (pixels)
# size:     image side in pixels
# n_img:    number of image-placeholder tokens in input_ids
#           (anyres: 16 base-tile tokens + 4 rows x (4 tile tokens + 1 newline))
# layout:   "bos_img" (BOS, IMG.., text) | "img_bos" (IMG.., BOS, text) | "qwen" (BOS, VSTART, IMG.., VEND, text)
#           | "wrapped" (same as "qwen": VSTART / VEND stand for BOI / EOI or <fake_token_around_image>)
#           | "pixtral" (BOS, per row of the merged grid: IMG.. + IMG_BREAK, the last row ending in IMG_END, text)
# key:      name of the pixel argument of forward
# extra:    extra inputs: "token_type_ids" (zeros), "image_token_type_ids" (token_type_ids, 1 at IMG),
#           "mm_token_type_ids", "qformer"
_SPECS: dict[str, dict] = {
    "llava": dict(cls="Llava", pixels="plain", size=56, n_img=16, config=dict(
        vision_config=_CLIP, text_config=_LLAMA, image_token_index=IMG, image_seq_length=16)),
    "llava_next": dict(cls="LlavaNext", pixels="anyres", size=56, n_img=16 + 4 * (4 + 1), config=dict(
        vision_config=_CLIP, text_config=_LLAMA, image_token_index=IMG, image_seq_length=16, **_ANYRES)),
    "llava_next_video": dict(cls="LlavaNextVideo", pixels="anyres", size=56, n_img=16 + 4 * (4 + 1), config=dict(
        vision_config=_CLIP, text_config=_LLAMA, image_token_index=IMG, video_token_index=VID,
        image_seq_length=16, video_seq_length=4, **_ANYRES)),
    "llava_onevision": dict(cls="LlavaOnevision", pixels="anyres", size=56, n_img=16 + 4 * (4 + 1), config=dict(
        vision_config=_SIGLIP, text_config=_QWEN2, image_token_index=IMG, video_token_index=VID, **_ANYRES)),
    "video_llava": dict(cls="VideoLlava", pixels="plain", size=56, n_img=16, key="pixel_values_images", config=dict(
        vision_config=_CLIP, text_config=_LLAMA, image_token_index=IMG, video_token_index=VID,
        image_seq_length=16, video_seq_length=16 * 8)),
    "fast_vlm": dict(cls="FastVlm", pixels="plain", size=128, n_img=4, config=dict(  # 128/64 = 2x2 tokens
        vision_config=_FASTVIT, text_config=_QWEN2, image_token_index=IMG, image_seq_length=4)),
    "vipllava": dict(cls="VipLlava", pixels="plain", size=56, n_img=16, config=dict(
        vision_config=_CLIP, text_config=_LLAMA, image_token_index=IMG, image_seq_length=16,
        vision_feature_layers=[-2, -1])),
    "paligemma": dict(cls="PaliGemma", pixels="plain", size=56, n_img=16, layout="img_bos",
                      extra=("token_type_ids",), config=dict(
        vision_config=_SIGLIP, text_config=_GEMMA, image_token_index=IMG, vocab_size=VOCAB,
        projection_dim=64, hidden_size=64)),
    "internvl": dict(cls="InternVL", pixels="plain", size=56, n_img=16, config=dict(  # 8x8 patches, shuffle 0.5
        vision_config=dict(_VIT, patch_size=7), text_config=_QWEN2, image_token_id=IMG, image_seq_length=16)),
    "qwen2_vl": dict(cls="Qwen2VL", pixels="qwen", size=56, patch=14, n_img=4, layout="qwen",
                     extra=("mm_token_type_ids",), config=dict(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14),
        text_config=dict(_TEXT, rope_parameters=_MROPE), **_QWENVL_IDS)),
    "qwen2_5_vl": dict(cls="Qwen2_5_VL", pixels="qwen", size=56, patch=14, n_img=4, layout="qwen",
                       extra=("mm_token_type_ids",), config=dict(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                           patch_size=14, window_size=56, fullatt_block_indexes=[1]),
        text_config=dict(_TEXT, rope_parameters=_MROPE), **_QWENVL_IDS)),
    "qwen3_vl": dict(cls="Qwen3VL", pixels="qwen", size=64, patch=16, n_img=4, layout="qwen",
                     extra=("mm_token_type_ids",), config=dict(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                           patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        text_config=dict(_TEXT, head_dim=16, rope_parameters=dict(_MROPE, mrope_interleaved=True)),
        **_QWENVL_IDS)),
    "blip2": dict(cls="Blip2", pixels="plain", size=56, n_img=4, layout="img_bos", config=dict(
        vision_config=_BLIPVIT, qformer_config=_QFORMER, text_config=_OPT, num_query_tokens=4, image_token_index=IMG)),
    "instructblip": dict(cls="InstructBlip", pixels="plain", size=56, n_img=4, layout="img_bos",
                         extra=("qformer",), config=dict(
        vision_config=_BLIPVIT, qformer_config=_QFORMER, text_config=_OPT, num_query_tokens=4, image_token_index=IMG)),
    # Idefics2: MLP + Perceiver resampler -> resampler_n_latents tokens per image
    "idefics2": dict(cls="Idefics2", pixels="5d", size=56, n_img=4, layout="wrapped", config=dict(
        vision_config=_IDEFICS_VIT, text_config=_MISTRAL, image_token_id=IMG, perceiver_config=dict(
            hidden_size=64, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=16,
            num_key_value_heads=1))),
    # Idefics3 / SmolVLM: pixel shuffle (scale 2) of the 4x4 patch grid -> 2x2 = 4 tokens, then one Linear
    "idefics3": dict(cls="Idefics3", pixels="5d", size=56, n_img=4, layout="wrapped", config=dict(
        vision_config=_IDEFICS_VIT, text_config=_LLAMA, image_token_id=IMG, scale_factor=2, pad_token_id=PAD)),
    "smolvlm": dict(cls="SmolVLM", pixels="5d", size=56, n_img=4, layout="wrapped", config=dict(
        vision_config=_IDEFICS_VIT, text_config=_LLAMA, image_token_id=IMG, scale_factor=2, pad_token_id=PAD)),
    # Gemma 3: 4x4 SigLIP patches avg-pooled (kernel 4 / sqrt(4) = 2) to mm_tokens_per_image = 4;
    # token_type_ids = 1 at image tokens (bidirectional attention inside the image block)
    "gemma3": dict(cls="Gemma3", pixels="plain", size=56, n_img=4, layout="wrapped",
                   extra=("image_token_type_ids",), config=dict(
        vision_config=_SIGLIP, text_config=_GEMMA3_TEXT, mm_tokens_per_image=4, image_token_index=IMG,
        boi_token_index=VSTART, eoi_token_index=VEND)),
    # Mistral 3: Pixtral 4x4 patch grid, 2x2 spatial merge -> 2x2 = 4 image tokens; the processor adds
    # IMG_BREAK after each row and IMG_END after the last one (plain text ids for the model)
    "mistral3": dict(cls="Mistral3", pixels="sized", size=56, n_img=4, layout="pixtral", config=dict(
        vision_config=_PIXTRAL, text_config=_MISTRAL, image_token_index=IMG, spatial_merge_size=2)),
    # Llama 4: 4x4 patches (+ CLS, dropped after the encoder), pixel shuffle 0.5 -> 4 tokens
    "llama4": dict(cls="Llama4", pixels="plain", size=56, n_img=4, layout="wrapped", config=dict(
        vision_config=_LLAMA4_VIT, text_config=_LLAMA4_TEXT, image_token_index=IMG,
        boi_token_index=VSTART, eoi_token_index=VEND)),
    # Aya Vision: SigLIP 4x4 patches, pixel shuffle (downsample 2) -> 4 tokens, LayerNorm + SwiGLU MLP
    "aya_vision": dict(cls="AyaVision", pixels="plain", size=56, n_img=4, config=dict(
        vision_config=_SIGLIP, text_config=_COHERE2, image_token_index=IMG, downsample_factor=2)),
    # Cohere2-Vision: Aya's pixel shuffle and chunked SwiGLU without the LayerNorm
    "cohere2_vision": dict(cls="Cohere2Vision", pixels="plain", size=56, n_img=4, config=dict(
        vision_config=_SIGLIP, text_config=_COHERE2, image_token_id=IMG, downsample_factor=2,
        alignment_intermediate_size=64)),
}

FAMILIES = list(_SPECS)
# Other spellings ``fastvlm check FAMILY`` accepts: transformers' model_type and its models/ folder name where they
# differ from the family name (BLIP-2 is "blip-2" and models/blip_2); "-" and "_" are interchangeable anyway.
ALIASES = {"blip_2": "blip2"}


def canonical_family(name: str) -> str | None:
    """The family name for ``name`` (a family, a transformers model_type or models/ folder name, or a
    ``family:part`` case of fastvlm.testing), or None when there is no such family."""
    key = name.strip().lower().replace("-", "_").split(":")[0]
    key = ALIASES.get(key, key)
    return key if key in _SPECS else None

_PROJECTORS = {
    "qwen2_vl": ["model.visual.merger"],
    "qwen2_5_vl": ["model.visual.merger"],
    "qwen3_vl": ["model.visual.merger"] + [
        f"model.visual.deepstack_merger_list.{i}"
        for i in range(len(_SPECS["qwen3_vl"]["config"]["vision_config"]["deepstack_visual_indexes"]))],
    "blip2": ["query_tokens", "language_projection"],
    "instructblip": ["query_tokens", "language_projection"],
    "idefics2": ["model.connector"],
    "idefics3": ["model.connector"],
    "smolvlm": ["model.connector"],
    "llama4": ["vision_model.vision_adapter", "multi_modal_projector"],
}


def projector_paths(family: str) -> list[str]:
    """Dotted attribute paths (from the top model) of the connector modules / parameters of ``family``."""
    if family not in _SPECS:
        raise KeyError(f"unknown family {family!r}; known: {FAMILIES}")
    return list(_PROJECTORS.get(family, ["model.multi_modal_projector"]))


def _resolve(model: nn.Module, path: str) -> list[tuple[str, nn.Parameter]]:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, nn.Parameter):
        return [(path, obj)]
    return [(f"{path}.{n}", p) for n, p in obj.named_parameters()]


@torch.no_grad()
def _fan_in_init_convs(module: nn.Module) -> None:
    """N(0, 2/fan_in) conv weights: HF's std=0.02 init makes the tiny FastViT output ~1e-23 (image ignored)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


def _llama4_output_shim(module, args, output):
    """transformers 5.24 ``Llama4ForConditionalGeneration.forward`` reads ``outputs.image_outputs`` off the
    language model's ``MoeCausalLMOutputWithPast`` (which has no such field) whenever it returns a dict, so
    every ``model(**inputs)`` / ``generate`` raises AttributeError.  Give the text output that attribute
    (``None``; a plain attribute, not a field) so the top model can build its output; no-op once fixed upstream."""
    if output is not None and not isinstance(output, tuple) and not hasattr(output, "image_outputs"):
        output.image_outputs = None
    return output


@torch.no_grad()
def randomize_projector(model: nn.Module, family: str, scale: float = 0.5) -> None:
    """Refill every connector parameter with ``randn * scale`` (norm weights: ``1 + 0.1 * randn``)."""
    norm_params = {id(p) for m in model.modules() if "Norm" in type(m).__name__
                   for p in m.parameters(recurse=False)}
    for path in projector_paths(family):
        for name, p in _resolve(model, path):
            if id(p) in norm_params:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * scale)


def _pixel_inputs(spec: dict, cfg) -> dict:
    s = spec["size"]
    if spec["pixels"] == "plain":
        return {spec.get("key", "pixel_values"): torch.randn(1, 3, s, s)}
    if spec["pixels"] == "anyres":
        return {"pixel_values": torch.randn(1, 2, 3, s, s), "image_sizes": torch.tensor([[s, s]])}
    if spec["pixels"] == "5d":  # (batch, images, C, H, W); an all-zero image would count as padding
        return {"pixel_values": torch.randn(1, 1, 3, s, s),
                "pixel_attention_mask": torch.ones(1, 1, s, s, dtype=torch.bool)}
    if spec["pixels"] == "sized":  # Pixtral: image_sizes (height, width) in pixels
        return {"pixel_values": torch.randn(1, 3, s, s), "image_sizes": torch.tensor([[s, s]])}
    # qwen: flattened patches [t*h*w, C * temporal_patch * patch * patch]
    vc, g = cfg.vision_config, s // spec["patch"]
    return {"pixel_values": torch.randn(g * g, 3 * vc.temporal_patch_size * vc.patch_size ** 2),
            "image_grid_thw": torch.tensor([[1, g, g]])}


def _text_inputs(spec: dict) -> dict:
    text = torch.randint(TEXT_LO, TEXT_HI, (N_TEXT,)).tolist()
    img = [IMG] * spec["n_img"]
    layout = spec.get("layout", "bos_img")
    if layout == "pixtral":  # square merged grid, row by row
        side = int(round(spec["n_img"] ** 0.5))
        img = [t for r in range(side) for t in [IMG] * side + [IMG_END if r == side - 1 else IMG_BREAK]]
    ids = {"bos_img": [BOS] + img + text,
           "img_bos": img + [BOS] + text,
           "pixtral": [BOS] + img + text,
           "qwen": [BOS, VSTART] + img + [VEND] + text,
           "wrapped": [BOS, VSTART] + img + [VEND] + text}[layout]
    input_ids = torch.tensor([ids])
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    extra = spec.get("extra", ())
    if "token_type_ids" in extra:  # PaliGemma: 0 = prefix (image + prompt), 1 = suffix
        out["token_type_ids"] = torch.zeros_like(input_ids)
    if "image_token_type_ids" in extra:  # Gemma 3: 1 = image token (bidirectional block)
        out["token_type_ids"] = (input_ids == IMG).long()
    if "mm_token_type_ids" in extra:  # Qwen-VL M-RoPE: 1 = image token
        out["mm_token_type_ids"] = (input_ids == IMG).long()
    if "qformer" in extra:  # InstructBLIP Q-Former prompt
        q = torch.randint(3, _QFORMER["vocab_size"], (1, 5))
        out["qformer_input_ids"], out["qformer_attention_mask"] = q, torch.ones_like(q)
    return out


def build_config(family: str):
    import transformers

    spec = _SPECS[family]
    return getattr(transformers, spec["cls"] + "Config")(**copy.deepcopy(spec["config"]))


def build_tiny_model(family: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Return ``(model, inputs)``: eval-mode fp32 CPU model with random weights, and its forward inputs."""
    if family not in _SPECS:
        raise KeyError(f"unknown family {family!r}; known: {FAMILIES}")
    import transformers

    spec = _SPECS[family]
    torch.manual_seed(seed)
    cfg = build_config(family)
    model = getattr(transformers, spec["cls"] + "ForConditionalGeneration")(cfg)
    # .float() casts only real floating tensors: .to(dtype=float32) would also turn complex buffers real
    # (Llama 4 vision RoPE ``freqs_ci``), silently dropping the rotation
    model = model.to("cpu").float().eval()
    if family == "fast_vlm":
        _fan_in_init_convs(model.model.vision_tower)
    if family == "llama4":
        model.language_model.register_forward_hook(_llama4_output_shim)
    randomize_projector(model, family)
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = PAD, EOS, BOS
    inputs = {**_text_inputs(spec), **_pixel_inputs(spec, cfg)}
    return model, inputs
