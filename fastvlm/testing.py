"""Tiny instances of every supported transformers projector, built from config classes (no download), and the
error bound used by the tests and by ``fastvlm check``. Needs transformers (the ``hf`` extra)."""
import math

import torch


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64."""
    out = out.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    den = ref.norm()
    return float((out - ref).norm() / (den if den > 0 else 1.0))


def tolerance(dtype, k, roundings=1):
    """Relative-error bound against a float64 reference: ``2 eps(dtype) sqrt(roundings) + 2 sqrt(K) eps(fp32)``.

    ``roundings``: how many times the result passes through ``dtype`` (norm output, activation, output);
    ``k``: the reduction length. The factor 2 covers the Triton interpreter's round-toward-zero bf16 casts.
    """
    return 2 * torch.finfo(dtype).eps * math.sqrt(roundings) + 2 * math.sqrt(k) * torch.finfo(torch.float32).eps


def randomize_(module, std=0.5):
    """Re-randomise every parameter in place (transformers initialises some to zero or one)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float32).mul_(std).to(p.dtype))
    return module

V = dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1)
T = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1,
         vocab_size=100)
CLIP = dict(model_type="clip_vision_model", **V)
SIGLIP = dict(model_type="siglip_vision_model", **V)
LLAMA = dict(model_type="llama", **T)
QWEN2 = dict(model_type="qwen2", **T)


def _cfg(name, **kw):
    import transformers

    return getattr(transformers, name)(**kw)


class FamilyUnavailable(ImportError):
    """The installed transformers has no such class (older or newer release)."""


def _mod(path, cls):
    import importlib

    try:
        return getattr(importlib.import_module("transformers.models." + path), cls)
    except (ImportError, AttributeError) as exc:
        raise FamilyUnavailable(f"transformers has no {path}.{cls}: {exc}") from exc


# a module case of FAMILIES (below) -> the original transformers module, random weights, eval mode
def build(family, act="gelu"):
    family = _OLD_NAMES.get(family, family)
    if family in ("llava", "llava_next", "llava_next_video", "video_llava"):
        cfgname = {"llava": "LlavaConfig", "llava_next": "LlavaNextConfig", "llava_next_video": "LlavaNextVideoConfig",
                   "video_llava": "VideoLlavaConfig"}[family]
        cls = {"llava": ("llava.modeling_llava", "LlavaMultiModalProjector"),
               "llava_next": ("llava_next.modeling_llava_next", "LlavaNextMultiModalProjector"),
               "llava_next_video": ("llava_next_video.modeling_llava_next_video", "LlavaNextVideoMultiModalProjector"),
               "video_llava": ("video_llava.modeling_video_llava", "VideoLlavaMultiModalProjector")}[family]
        m = _mod(*cls)(_cfg(cfgname, vision_config=CLIP, text_config=LLAMA, projector_hidden_act=act))
    elif family == "llava_onevision":
        m = _mod("llava_onevision.modeling_llava_onevision", "LlavaOnevisionMultiModalProjector")(
            _cfg("LlavaOnevisionConfig", vision_config=SIGLIP, text_config=QWEN2, projector_hidden_act=act))
    elif family == "fast_vlm":
        cfg = _cfg("FastVlmConfig", text_config=QWEN2, projector_hidden_act=act)
        cfg.vision_config.hidden_size = 48
        m = _mod("fast_vlm.modeling_fast_vlm", "FastVlmMultiModalProjector")(cfg)
    elif family == "paligemma":
        m = _mod("paligemma.modeling_paligemma", "PaliGemmaMultiModalProjector")(
            _cfg("PaliGemmaConfig", vision_config=dict(projection_dim=64, **SIGLIP),
                 text_config=dict(model_type="gemma", head_dim=16, **T)))
    elif family == "vipllava":
        m = _mod("vipllava.modeling_vipllava", "VipLlavaMultiModalProjector")(
            _cfg("VipLlavaConfig", vision_config=CLIP, text_config=LLAMA, projector_hidden_act=act))
    elif family == "internvl":
        m = _mod("internvl.modeling_internvl", "InternVLMultiModalProjector")(
            _cfg("InternVLConfig", vision_config=dict(model_type="internvl_vision", **V), text_config=QWEN2,
                 projector_hidden_act=act))
    elif family == "qwen2_vl":
        m = _mod("qwen2_vl.modeling_qwen2_vl", "PatchMerger")(dim=40, context_dim=24, spatial_merge_size=2)
    elif family == "qwen2_5_vl":
        m = _mod("qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLPatchMerger")(dim=40, context_dim=24)
    elif family in ("qwen3_vl", "qwen3_vl:deepstack"):
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

        cfg = Qwen3VLVisionConfig(hidden_size=24, out_hidden_size=40, num_heads=4, intermediate_size=32, depth=1)
        m = _mod("qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionPatchMerger")(
            cfg, use_postshuffle_norm=family == "qwen3_vl:deepstack")
    elif family in ("idefics3", "smolvlm"):
        cfg_cls, vt, scale = (("Idefics3Config", "idefics3_vision", 2) if family == "idefics3" else
                              ("SmolVLMConfig", "smolvlm_vision", 3))
        path = ("idefics3.modeling_idefics3", "Idefics3Connector") if family == "idefics3" else \
            ("smolvlm.modeling_smolvlm", "SmolVLMConnector")
        m = _mod(*path)(_cfg(cfg_cls, vision_config=dict(model_type=vt, **V), text_config=LLAMA, scale_factor=scale))
    elif family in ("llama4:adapter", "llama4:projector"):
        from transformers.models.llama4.configuration_llama4 import Llama4VisionConfig

        vc = Llama4VisionConfig(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                                pixel_shuffle_ratio=0.5, projector_input_dim=80, projector_output_dim=80,
                                vision_output_dim=80, image_size=56, patch_size=14)
        if family == "llama4:adapter":
            m = _mod("llama4.modeling_llama4", "Llama4VisionPixelShuffleMLP")(vc)
        else:
            m = _mod("llama4.modeling_llama4", "Llama4MultiModalProjector")(_cfg(
                "Llama4Config", vision_config=vc.to_dict(), text_config=dict(
                    hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                    num_hidden_layers=1, vocab_size=100)))
    elif family == "idefics2:mlp":
        m = _mod("idefics2.modeling_idefics2", "Idefics2MLP")(hidden_size=48, intermediate_size=72, output_size=40,
                                                             hidden_act="silu")
    elif family == "aya_vision":
        cfg = _cfg("AyaVisionConfig", vision_config=SIGLIP, text_config=dict(model_type="cohere2", pad_token_id=0, bos_token_id=1, eos_token_id=2, **T),
                   downsample_factor=2)
        cfg.alignment_intermediate_size = 80
        m = _mod("aya_vision.modeling_aya_vision", "AyaVisionMultiModalProjector")(cfg)
    elif family == "gemma3":
        m = _mod("gemma3.modeling_gemma3", "Gemma3MultiModalProjector")(_cfg(
            "Gemma3Config", vision_config=dict(SIGLIP, image_size=56, patch_size=7),
            text_config=dict(model_type="gemma3_text", head_dim=16, **T), mm_tokens_per_image=16))
    elif family == "mistral3":
        m = _mod("mistral3.modeling_mistral3", "Mistral3MultiModalProjector")(_cfg(
            "Mistral3Config", vision_config=dict(model_type="pixtral", hidden_size=48, intermediate_size=64,
                                                 num_attention_heads=4, num_hidden_layers=1, patch_size=14,
                                                 image_size=112, head_dim=12),
            text_config=dict(model_type="mistral", **T), spatial_merge_size=2))
    else:
        raise KeyError(family)
    return randomize_(m.eval())


# The module cases: a family name of fastvlm.tiny_models.FAMILIES (the one naming scheme, also `fastvlm check
# FAMILY`'s), followed by ":part" where a family has more than one connector module.
FAMILIES = ["llava", "llava_next", "llava_next_video", "llava_onevision", "video_llava", "fast_vlm", "paligemma",
            "vipllava", "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl:deepstack", "idefics3", "smolvlm",
            "llama4:adapter", "llama4:projector", "gemma3", "mistral3", "aya_vision", "idefics2:mlp"]
# earlier names of the cases, still accepted by build / args_for / input_for
_OLD_NAMES = {"qwen3_vl_deepstack": "qwen3_vl:deepstack", "llama4_adapter": "llama4:adapter",
              "llama4_projector": "llama4:projector", "idefics2_mlp": "idefics2:mlp"}


def case_family(case):
    """The family of a module case ("llama4:adapter" -> "llama4")."""
    return _OLD_NAMES.get(case, case).split(":")[0]


MERGED = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl:deepstack"}


def args_for(family, module, tokens=12, dtype=torch.float32, device="cpu"):
    """Random forward arguments shaped as the family's caller passes them (a tuple)."""
    family = _OLD_NAMES.get(family, family)
    r = lambda *shape: torch.randn(*shape, dtype=dtype, device=device) * 2 + 0.5  # noqa: E731
    if family == "idefics3":
        return (r(2, 36, 48),)  # 6 x 6 grid, scale 2
    if family == "smolvlm":
        return (r(2, 36, 48),)  # 6 x 6 grid, scale 3
    if family == "llama4:adapter":
        return (r(3, 16, 16),)  # 4 x 4 grid of 16 channels, ratio 0.5
    if family == "llama4:projector":
        return (r(5, 80),)
    if family == "gemma3":
        return (r(2, 64, 48),)  # 8 x 8 grid pooled by 2
    if family == "aya_vision":
        return (r(2, 36, 48),)  # 6 x 6 grid, downsample 2
    if family == "idefics2:mlp":
        return (r(2, 7, 48),)
    if family == "mistral3":  # two images of 4 x 6 and 2 x 2 patches (patch 14), packed in one sequence
        return r(28, 48), torch.tensor([[56, 84], [28, 28]], device=device)
    return (input_for(family, module, tokens, dtype, device),)


def input_for(family, module, tokens=12, dtype=torch.float32, device="cpu"):
    """A random input shaped as the family's caller passes it ([B, P, D], or [patches, D] for the mergers)."""
    family = _OLD_NAMES.get(family, family)
    lin = module.get_submodule({"paligemma": "linear"}.get(family, "linear_1" if family not in MERGED else
                                                         ("mlp.0" if family.startswith("qwen2") else "linear_fc1")))
    if family in MERGED:
        width = lin.in_features // 4
        return torch.randn(4 * tokens, width, dtype=dtype, device=device) * 2 + 0.5
    return torch.randn(2, tokens // 2 + 1, lin.in_features, dtype=dtype, device=device) * 2 + 0.5
