"""The patch-embedding families as data: one ``EmbedRecipe`` per original embedding class (fastvlm.nn.patch_embed
builds ``Fused<Original>`` from a recipe)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class EmbedRecipe:
    family: str
    module: str
    cls: str
    fused_name: str
    kind: str  # "conv_pos" (Conv2d + class token + position table), "rows" (pre-patchified rows: Qwen-VL),
    #            "timm" (timm's PatchEmbed: conv + output format + norm; no positions),
    #            "navit" (Idefics2/3, SmolVLM: Conv2d + NaViT bucketed position ids from patch_attention_mask),
    #            "internvl" (InternVL: Conv2d child + class token + position Parameter, bicubic per size),
    #            "unfold" (Llama 4: nn.Unfold + bias-free Linear, the weight viewed as a conv kernel)
    conv: str = "patch_embedding"
    cls_token: Optional[str] = None  # attribute of the class-token Parameter ([D] or [1, 1, D])
    pos: Optional[str] = None  # attribute of the position table: an nn.Embedding or a Parameter [1, L, D]


_T = "transformers.models."
EMBED_RECIPES = (
    EmbedRecipe("clip", _T + "clip.modeling_clip", "CLIPVisionEmbeddings", "FusedCLIPVisionEmbeddings", "conv_pos",
                cls_token="class_embedding", pos="position_embedding"),
    EmbedRecipe("siglip", _T + "siglip.modeling_siglip", "SiglipVisionEmbeddings", "FusedSiglipVisionEmbeddings",
                "conv_pos", pos="position_embedding"),
    EmbedRecipe("blip_2", _T + "blip_2.modeling_blip_2", "Blip2VisionEmbeddings", "FusedBlip2VisionEmbeddings",
                "conv_pos", cls_token="class_embedding", pos="position_embedding"),
    EmbedRecipe("instructblip", _T + "instructblip.modeling_instructblip", "InstructBlipVisionEmbeddings",
                "FusedInstructBlipVisionEmbeddings", "conv_pos", cls_token="class_embedding", pos="position_embedding"),
    EmbedRecipe("qwen2_vl", _T + "qwen2_vl.modeling_qwen2_vl", "PatchEmbed", "FusedQwen2VLPatchEmbed", "rows",
                conv="proj"),
    EmbedRecipe("timm", "timm.layers.patch_embed", "PatchEmbed", "FusedTimmPatchEmbed", "timm", conv="proj"),
    EmbedRecipe("qwen2_5_vl", _T + "qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionPatchEmbed",
                "FusedQwen2_5_VisionPatchEmbed", "rows", conv="proj"),
    EmbedRecipe("qwen3_vl", _T + "qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionPatchEmbed", "FusedQwen3VLVisionPatchEmbed",
                "rows", conv="proj"),
    EmbedRecipe("qwen3_vl_moe", _T + "qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeVisionPatchEmbed",
                "FusedQwen3VLMoeVisionPatchEmbed", "rows", conv="proj"),
    EmbedRecipe("idefics2", _T + "idefics2.modeling_idefics2", "Idefics2VisionEmbeddings",
                "FusedIdefics2VisionEmbeddings", "navit", pos="position_embedding"),
    EmbedRecipe("idefics3", _T + "idefics3.modeling_idefics3", "Idefics3VisionEmbeddings",
                "FusedIdefics3VisionEmbeddings", "navit", pos="position_embedding"),
    EmbedRecipe("smolvlm", _T + "smolvlm.modeling_smolvlm", "SmolVLMVisionEmbeddings", "FusedSmolVLMVisionEmbeddings",
                "navit", pos="position_embedding"),
    EmbedRecipe("internvl", _T + "internvl.modeling_internvl", "InternVLVisionEmbeddings",
                "FusedInternVLVisionEmbeddings", "internvl", conv="patch_embeddings.projection", cls_token="cls_token",
                pos="position_embeddings"),
    EmbedRecipe("llama4", _T + "llama4.modeling_llama4", "Llama4UnfoldConvolution", "FusedLlama4UnfoldConvolution",
                "unfold", conv="linear"),
)
