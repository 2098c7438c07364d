"""The projector families as data: one ``ProjectorRecipe`` per original connector class (fastvlm.nn.projector builds
``Fused<Original>`` from a recipe)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ProjectorRecipe:
    family: str
    module: str  # transformers module that defines the original class
    cls: str  # original class name
    fused_name: str
    input_name: str  # the original forward's argument name (callers may pass it by keyword)
    linear_1: str
    linear_2: Optional[str] = None
    act: Optional[str] = None
    norm: Optional[str] = None
    merged_width: Optional[str] = None  # attribute with the merged row width: forward views x as (-1, width)
    merge: Optional[str] = None  # "pixel_shuffle" | "avg_pool" | "unfold": how tokens are merged before linear_1
    scale: Optional[str] = None  # attribute holding the merge scale (a ratio < 1 is inverted, as Llama 4's 0.5)
    act2: Optional[str] = None  # activation after linear_2 (Llama 4's adapter)
    weight_in_out: Optional[str] = None  # a Parameter [in, out] used instead of linear_1 (Gemma 3)
    merger: Optional[str] = None  # a bias-free Linear applied to the merged rows before linear_1 (Mistral 3)
    extra_input: Optional[str] = None  # a second forward argument (Mistral 3's image_sizes)
    gated: bool = False  # linear_1's output chunked into (up, gate) halves: act(gate) * up (Aya's SwiGLU)
    up: Optional[str] = None  # a separate up Linear: act(linear_1(x)) * up(x) (Idefics2's gate_proj / up_proj)
    grid_output: bool = False  # return [B, H/s, W/s, out] instead of [B, tokens, out] (Aya)
    grid_input: bool = False  # the input is already a grid [B, H, W, C], possibly not square (LFM2-VL)


def _llava_like(family, module, cls):
    return ProjectorRecipe(family, module, cls, f"Fused{cls}", "image_features", "linear_1", "linear_2", "act")


_T = "transformers.models."
RECIPES = (
    _llava_like("llava", _T + "llava.modeling_llava", "LlavaMultiModalProjector"),
    _llava_like("llava_next", _T + "llava_next.modeling_llava_next", "LlavaNextMultiModalProjector"),
    _llava_like("llava_next_video", _T + "llava_next_video.modeling_llava_next_video",
                "LlavaNextVideoMultiModalProjector"),
    _llava_like("llava_onevision", _T + "llava_onevision.modeling_llava_onevision", "LlavaOnevisionMultiModalProjector"),
    _llava_like("video_llava", _T + "video_llava.modeling_video_llava", "VideoLlavaMultiModalProjector"),
    _llava_like("fast_vlm", _T + "fast_vlm.modeling_fast_vlm", "FastVlmMultiModalProjector"),
    ProjectorRecipe("paligemma", _T + "paligemma.modeling_paligemma", "PaliGemmaMultiModalProjector",
                    "FusedPaliGemmaMultiModalProjector", "image_features", "linear"),
    ProjectorRecipe("vipllava", _T + "vipllava.modeling_vipllava", "VipLlavaMultiModalProjector",
                    "FusedVipLlavaMultiModalProjector", "hidden_states", "linear_1", "linear_2", "act",
                    norm="projector_layernorm"),
    ProjectorRecipe("internvl", _T + "internvl.modeling_internvl", "InternVLMultiModalProjector",
                    "FusedInternVLMultiModalProjector", "image_features", "linear_1", "linear_2", "act",
                    norm="layer_norm"),
    ProjectorRecipe("qwen2_vl", _T + "qwen2_vl.modeling_qwen2_vl", "PatchMerger", "FusedQwen2VLPatchMerger", "x",
                    "mlp.0", "mlp.2", "mlp.1", norm="ln_q", merged_width="hidden_size"),
    ProjectorRecipe("qwen2_5_vl", _T + "qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLPatchMerger",
                    "FusedQwen2_5_VLPatchMerger", "x", "mlp.0", "mlp.2", "mlp.1", norm="ln_q",
                    merged_width="hidden_size"),
    ProjectorRecipe("qwen3_vl", _T + "qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionPatchMerger",
                    "FusedQwen3VLVisionPatchMerger", "x", "linear_fc1", "linear_fc2", "act_fn", norm="norm",
                    merged_width="hidden_size"),
    ProjectorRecipe("qwen3_vl_moe", _T + "qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeVisionPatchMerger",
                    "FusedQwen3VLMoeVisionPatchMerger", "x", "linear_fc1", "linear_fc2", "act_fn", norm="norm",
                    merged_width="hidden_size"),
    # space-to-depth and pooling connectors: the merge happens inside the GEMM's A loads
    ProjectorRecipe("idefics3", _T + "idefics3.modeling_idefics3", "Idefics3Connector", "FusedIdefics3Connector",
                    "image_hidden_states", "modality_projection.proj", merge="pixel_shuffle", scale="scale_factor"),
    ProjectorRecipe("smolvlm", _T + "smolvlm.modeling_smolvlm", "SmolVLMConnector", "FusedSmolVLMConnector",
                    "image_hidden_states", "modality_projection.proj", merge="pixel_shuffle", scale="scale_factor"),
    ProjectorRecipe("llama4", _T + "llama4.modeling_llama4", "Llama4VisionPixelShuffleMLP",
                    "FusedLlama4VisionPixelShuffleMLP", "encoded_patches", "mlp.fc1", "mlp.fc2", "mlp.activation_fn",
                    merge="pixel_shuffle", scale="pixel_shuffle_ratio", act2="mlp.activation_fn"),
    ProjectorRecipe("llama4", _T + "llama4.modeling_llama4", "Llama4MultiModalProjector",
                    "FusedLlama4MultiModalProjector", "image_features", "linear_1"),
    ProjectorRecipe("aya_vision", _T + "aya_vision.modeling_aya_vision", "AyaVisionMultiModalProjector",
                    "FusedAyaVisionMultiModalProjector", "image_features", "linear_1", "linear_2", "act",
                    norm="layernorm", merge="pixel_shuffle", scale="downsample_factor", gated=True, grid_output=True),
    # Cohere2-Vision: Aya's projector without its LayerNorm (same pixel shuffle, same chunked SwiGLU)
    ProjectorRecipe("cohere2_vision", _T + "cohere2_vision.modeling_cohere2_vision", "Cohere2VisionMultiModalProjector",
                    "FusedCohere2VisionMultiModalProjector", "image_features", "linear_1", "linear_2", "act",
                    merge="pixel_shuffle", scale="downsample_factor", gated=True, grid_output=True),
    # LFM2-VL: the same space-to-depth order on a [B, H, W, C] grid of any aspect, optional LayerNorm, MLP
    ProjectorRecipe("lfm2_vl", _T + "lfm2_vl.modeling_lfm2_vl", "Lfm2VlMultiModalProjector",
                    "FusedLfm2VlMultiModalProjector", "image_features", "linear_1", "linear_2", "act",
                    norm="layer_norm", merge="pixel_shuffle", scale="factor", grid_output=True, grid_input=True),
    ProjectorRecipe("idefics2", _T + "idefics2.modeling_idefics2", "Idefics2MLP", "FusedIdefics2MLP", "x",
                    "gate_proj", "down_proj", "act_fn", up="up_proj"),
    ProjectorRecipe("gemma3", _T + "gemma3.modeling_gemma3", "Gemma3MultiModalProjector",
                    "FusedGemma3MultiModalProjector", "vision_outputs", "", norm="mm_soft_emb_norm", merge="avg_pool",
                    weight_in_out="mm_input_projection_weight"),
    ProjectorRecipe("mistral3", _T + "mistral3.modeling_mistral3", "Mistral3MultiModalProjector",
                    "FusedMistral3MultiModalProjector", "image_features", "linear_1", "linear_2", "act", norm="norm",
                    merge="unfold", scale="patch_merger.spatial_merge_size", merger="patch_merger.merging_layer",
                    extra_input="image_sizes"),
)
