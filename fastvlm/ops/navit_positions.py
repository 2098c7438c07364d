"""NaViT bucketed position ids (Idefics2/3, SmolVLM vision embeddings), batched on the mask's device."""
from __future__ import annotations

import torch

from fastvlm._cache import shared_cache


@shared_cache(16)  # device tables: safe across threads and CUDA streams
def _bucket_edges_cached(side, device, dtype):
    return torch.arange(1 / side, 1.0, 1 / side, device=torch.device(device), dtype=dtype)


def _bucket_edges(side, device):
    """Bucket boundaries 1/S, 2/S, ... < 1 in the default float dtype, built by the same float ``arange`` as
    transformers (its length is S - 1 or S depending on rounding, e.g. S = 14 or 28 give S with a last edge of 1.0)."""
    dtype = torch.get_default_dtype()
    if torch.compiler.is_compiling():
        return torch.arange(1 / side, 1.0, 1 / side, device=device, dtype=dtype)
    return _bucket_edges_cached(side, str(device), dtype)


def _axis_buckets(counts, length, edges):
    """[N, length] bucket of each patch index along one axis of an image with ``counts`` valid patches on it."""
    frac = torch.arange(length, device=counts.device, dtype=torch.float32)[None, :] * (1.0 / counts)[:, None]
    return torch.bucketize(frac.clamp(max=1.0 - 1e-6), edges, right=True)


def navit_position_ids(patch_attention_mask, side):
    """NaViT position ids [N, Hp * Wp] of Idefics2/3 and SmolVLM vision embeddings.

    Image n has ``h`` valid patch rows (the valid entries of mask[n, :, 0]) and ``w`` valid columns (mask[n, 0, :]);
    patch (i, j) lies at the fractional coordinates (i / h, j / w), clamped below 1, and falls in bucket
    (bi, bj) of a side x side grid over [0, 1): its id is bi * side + bj. Masked-out patches get id 0. Batched over
    images with tensor ops on the mask's device (no per-image loop), with the same float steps as transformers,
    so the ids are identical, fractional edge cases included.
    """
    N, Hp, Wp = patch_attention_mask.shape
    edges = _bucket_edges(side, patch_attention_mask.device)
    bh = _axis_buckets(patch_attention_mask[:, :, 0].sum(dim=1), Hp, edges)
    bw = _axis_buckets(patch_attention_mask[:, 0, :].sum(dim=1), Wp, edges)
    ids = (bh[:, :, None] * side + bw[:, None, :]).reshape(N, Hp * Wp)
    return ids.masked_fill(~patch_attention_mask.reshape(N, Hp * Wp), 0)
