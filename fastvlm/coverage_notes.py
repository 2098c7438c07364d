"""What class inspection cannot tell about a family of transformers' image-text-to-text mapping (data, read by
``fastvlm coverage``; each entry was checked against the family's modeling code in transformers 5.24).

model type: (kind, text). Kinds:
  "structure"  fused by recognition by structure at patch time (not a copy of a recipe class): the text names it;
  "partly"     "fused by structure | not fused: why" (either side may be empty when class inspection finds it);
  "unsupported" nothing fused yet: the op fastvlm has no kernel or recognition for;
  "nothing"    nothing to fuse (no image connector): why.
Families fused by a class recipe or a copy of one need no entry unless a part stays unfused.
"""

_GLM_CONV = "the vision model's downsample (a 2x2 stride-2 Conv2d over each window's rows, as one GEMM)"
_GLM_RMS = ("post_layernorm (the RMSNorm before the downsample) runs as its own module, not yet in the downsample's "
            "GEMM; the GELU between the merger's LayerNorm and its SwiGLU runs as a PyTorch op")
_GLM = _GLM_CONV + " | " + _GLM_RMS  # the merger itself is a recipe (Glm4v) or a copy of it (Glm4vMoe, GlmOcr)
_GLM5 = (_GLM_CONV + " | Glm5NextVisionPatchMerger: its SwiGLU clamps gate and up (swiglu_limit), no fused clamp "
         "yet; " + _GLM_RMS.partition(";")[0])
_GEMMA4 = ("rows with an affine rescale and a 2-D position table, a position-keyed average pooler, RMSNorm + Linear: no "
           "fused chain yet")
_SAM = ("a SAM-style patch conv, then 3x3 stride-2 convolutions and a Linear over the NCHW map (the feature-map "
        "projector's territory): no fused chain yet")
_HUNYUAN = ("the merger: RMSNorm, a 2x2 stride-2 Conv2d, activation, a 1x1 Conv2d, a newline column, Linear, "
            "begin/end tokens, RMSNorm: no fused chain yet")

NOTES = {
    "apertus1p5": ("nothing", "images enter as discrete codes of its vision tokenizer: no vision-to-LLM connector"),
    "aria": ("partly", " | AriaProjector: a learned-query cross-attention resampler (the attention kernel's "
                       "territory), not fused"),
    "blip": ("partly", " | no connector: the text decoder cross-attends to the image features"),
    "chameleon": ("nothing", "images enter as VQ-VAE tokens: no vision-to-LLM connector"),
    "cosmos3_edge": ("partly", "Cosmos3EdgePatchMerger (LayerNorm per patch, 2x2 merge, MLP) | "
                               "Cosmos3EdgeVisionEmbeddings: a Linear on pre-patchified rows plus block-ordered "
                               "interpolated positions and two inputs, not recognised yet"),
    "deepseek_ocr2": ("unsupported", _SAM),
    "deepseek_vl": ("structure", "DeepseekVLAligner (Linear-GELU-Linear)"),
    "deepseek_vl_hybrid": ("partly", " | DeepseekVLHybridAligner: a two-source aligner (low- and high-resolution "
                                     "features), not fused"),
    "diffusion_gemma": ("unsupported", "Gemma 4's vision embedder: " + _GEMMA4),
    "dots3_note": ("partly", "Dots3NoteAudioAdapter (LayerNorm + MLP) | Dots3NoteVisionPatchEmbed: a conv with an "
                             "RMSNorm inside the module (a pairing like Pixtral's), not fused yet"),
    "emu3": ("nothing", "images enter as VQ-VAE tokens: no vision-to-LLM connector"),
    "ernie4_5_vl_moe": ("partly", "Ernie4_5_VLMoePatchEmbed (a Linear on pre-patchified rows) | the variable-"
                                  "resolution resampler: spatial and temporal MLPs with LayerNorms, not fused"),
    "evolla": ("nothing", "protein-sequence input: no image path"),
    "florence2": ("unsupported", "a DaViT convolutional stem; the projector sums positions, takes means, then Linear "
                                 "and LayerNorm: no fused chain yet"),
    "gemma3n": ("unsupported", "a MobileNetV5 convolutional tower; the embedder is RMSNorm + Linear + RMSNorm: no "
                               "fused chain yet"),
    "gemma4": ("unsupported", _GEMMA4),
    "gemma4_unified": ("unsupported", _GEMMA4),
    "git": ("partly", " | GitProjection: Linear + LayerNorm with no residual (the dense + LayerNorm kernel has no "
                      "residual-free mode yet)"),
    "glm46v": ("partly", _GLM),
    "glm4v": ("partly", _GLM),
    "glm4v_moe": ("partly", _GLM),
    "glm5_next": ("partly", _GLM5),
    "glm_ocr": ("partly", _GLM),
    "glmga": ("partly", _GLM),
    "got_ocr2": ("unsupported", _SAM),
    "granite4_vision": ("partly", " | Granite4VisionWindowQFormerDownsampler: a windowed Q-Former downsampler, not "
                                  "fused"),
    "granite_docling": ("partly", " | the connector's pixel shuffle "
                                  "+ Linear + position sums, not fused"),
    "hunyuan_vl": ("unsupported", _HUNYUAN),
    "hy_v4_vl": ("unsupported", "the merger: RMSNorm, a 2x2 stride-2 Conv2d, activation, a 1x1 Conv2d to the text "
                                "width, a newline column: no fused chain yet"),
    "idefics": ("partly", "IdeficsVisionEmbeddings (CLIP-like conv + class token + positions) | the Perceiver "
                          "resampler and gated cross-attention layers, not fused"),
    "inkling2": ("partly", " | Inkling2VisionEmbeddings: a Linear on "
                           "merge-ordered rows plus interpolated positions and a class token, not recognised yet"),
    "inkling2_loop": ("partly", " | Inkling2VisionEmbeddings: a Linear on "
                                "merge-ordered rows plus interpolated positions and a class token, not recognised "
                                "yet"),
    "inkling_mm_model": ("unsupported", "the vision tower is a stack of space-to-depth folds each followed by a "
                                        "Linear, ending at the text width (no separate connector): not recognised"),
    "janus": ("structure", "JanusVisionEmbeddings (conv + position table), JanusVisionAlignerMLP "
                           "(Linear-GELU-Linear)"),
    "kimi_k25": ("unsupported", "Kimi_K25MultimodalProjection: Qwen2-VL's merger viewed per batch ([B, N/4, D], not "
                                "rows), not recognised yet; Kimi_K25VisionPatchEmbed adds its position module inside "
                                "the module (two inputs)"),
    "kosmos-2": ("partly", " | Kosmos2ImageToTextProjection: latent-query "
                           "cross-attention, not fused"),
    "kosmos-2.5": ("unsupported", "a latent-query cross-attention resampler (the attention kernel's territory)"),
    "lfm3_vl": ("structure", "Lfm3VlMultiModalProjector (LayerNorm per patch, 2x2 merge, MLP)"),
    "minicpm_ocr": ("partly", "MiniCPMOcrDownsampleMLP (merge, LayerNorm + MLP) | the windowed-attention merger, "
                              "not fused"),
    "minicpmv4_6": ("partly", "MiniCPMV4_6DownsampleMLP (merge, LayerNorm + MLP) | the windowed-attention merger, "
                              "not fused"),
    "minicpmv4_7": ("partly", "MiniCPMV4_7DownsampleMLP (merge, LayerNorm + MLP) | the windowed-attention merger, "
                              "not fused"),
    "minimax_m3_vl": ("partly", " | MiniMaxM3VLMultiModalProjector: two "
                                "MLPs with a free 2x2 merge between, not recognised yet"),
    "mistral4": ("nothing", "a text-only class in the image-text-to-text mapping"),
    "mllama": ("partly", " | MllamaVisionModel's patch conv: a bare Conv2d with tile positions and gated "
                         "embeddings inline in its forward, not paired yet"),
    "molmo2": ("unsupported", "index-gathered attention pooling then a SwiGLU projector: no fused chain yet"),
    "muse_glimmer": ("partly", "MuseGlimmerVisionAdapter (Linear-GELU-Linear-GELU) | "
                               "MuseGlimmerVisionPatchEmbedder: a Linear on rows plus interpolated positions, two "
                               "inputs, not recognised yet"),
    "muse_spark": ("partly", "MuseSparkVisionAdapter (Linear-GELU-Linear-GELU) | MuseSparkVisionPatchEmbedder: a "
                             "Linear on rows plus interpolated positions, two inputs, not recognised yet"),
    "nemotron_h_omni": ("unsupported", "the projector is InternVL's code with a ReLU-squared activation, which has "
                                       "no fused kernel (recognised, reported as not swapped)"),
    "ovis2": ("unsupported", "a softmax over a visual vocabulary times an embedding table: no fused chain yet"),
    "ovis2_5": ("unsupported", "Ovis2_5MultiModalProjector: a 2x2 row merge, Linear, LayerNorm, a softmax over the "
                               "visual vocabulary, then an embedding-table Linear: no fused chain for the softmax yet"),
    "paddleocr_vl": ("unsupported", "PaddleOCRProjector: LayerNorm, a 2x2 gather of each image's grid from "
                                    "image_grid_thw, then an MLP (two inputs): not recognised yet"),
    "perception_lm": ("unsupported", "PerceptionLMMultiModalProjector: an MLP then 2x2 average pooling of its "
                                     "output: the pooling after the second GEMM is not fused yet"),
    "pix2struct": ("nothing", "an encoder-decoder over flattened patches: no vision-to-LLM connector"),
    "pp_chart2table": ("unsupported", _SAM),
    "pp_formulanet": ("unsupported", _SAM),
    "step3p7": ("partly", "Step3p7VisionEmbeddings (conv + position table) | the projector: strided convolutions "
                          "and a Linear over the map, not fused"),
    "udop": ("nothing", "a document encoder-decoder over text, layout and image patches: no vision-to-LLM "
                        "connector"),
    "unlimited_ocr": ("unsupported", _SAM),
    "video_llama_3": ("structure", "VideoLlama3Projector (Linear-GELU-Linear)"),
    "vision-encoder-decoder": ("nothing", "a generic encoder-decoder wrapper: the encoder and decoder it is built "
                                          "from decide"),
}
