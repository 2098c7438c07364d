"""Meta tensors (shape tracing) through the drop-in modules whose forwards check autocast: the originals accept them,
so the fused modules must too (``torch.is_autocast_enabled("meta")`` raises; fastvlm.ops._checks.autocast_on does
not), with the original's output shape."""
import torch

import fastvlm


def _same_on_meta(original, fused, *args, **kwargs):
    original, fused = original.to("meta"), fused.to("meta")
    with torch.no_grad():
        ref = original(*args, **kwargs)
        out = fused(*args, **kwargs)
    ref = getattr(ref, "last_hidden_state", ref)
    out = getattr(out, "last_hidden_state", out)
    assert out.device.type == "meta" and out.shape == ref.shape and out.dtype == ref.dtype


def test_qformer_on_meta():
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             encoder_hidden_size=40, cross_attention_frequency=2)
    m = Blip2QFormerModel(cfg).eval()
    fused = fastvlm.nn.from_module(Blip2QFormerModel(cfg).eval())
    q = torch.empty(2, 8, 32, device="meta")
    enc = torch.empty(2, 10, 40, device="meta")
    _same_on_meta(m, fused, query_embeds=q, encoder_hidden_states=enc)


def test_clip_embeddings_on_meta():
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

    cfg = CLIPVisionConfig(hidden_size=32, num_attention_heads=2, image_size=28, patch_size=14)
    m = CLIPVisionEmbeddings(cfg).eval()
    fused = fastvlm.nn.from_module(CLIPVisionEmbeddings(cfg).eval())
    _same_on_meta(m, fused, torch.empty(2, 3, 28, 28, device="meta"))
