"""The Qwen3-VL pairing: the vision model's interpolated ``pos_embed`` rows summed in ``fastvlm::rows_embed``'s
epilogue. The wrapped ``forward`` computes the interpolation taps once and passes them to the original forward as
its precomputed ``interp_indices`` / ``interp_weights``; they travel with the open call (fastvlm/nn/pair_state.py)
to the patch embedding, and the paired ``pos_embed`` answers that very index tensor with zeros.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from fastvlm.nn.pair_state import call_of, has_hooks, taken


def _take_qwen3_positions(embed, x):
    """Armed Qwen3-VL pair: (the call, now taken, and the (table, indices, weights) to add in this op call), else
    (None, None)."""
    call = taken(embed)
    if call is None or call.pair.kind != "qwen3" or call.taps is None:
        return None, None
    pair = call.pair
    consumer = getattr(pair.parent, pair.norm_attr)
    idx, w = call.taps
    if (consumer is not pair.norm or has_hooks(embed, consumer) or pair.parent.patch_embed is not embed
            or not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64
            or not isinstance(w, torch.Tensor) or w.dim() != 2 or consumer.weight.dtype != x.dtype
            or idx.device != x.device):
        return None, None  # the parent's own code adds its positions (and raises its own errors)
    if torch.compiler.is_compiling():
        # the taps' length is data-dependent (a sum over grid_thw) when traced; the parent's add needs it equal to
        # the number of rows anyway, so assert it instead of branching on it
        torch._check(idx.shape[0] == x.shape[0])
        torch._check(w.shape[0] == x.shape[0])
        torch._check(w.shape[1] == idx.shape[1])
    elif idx.shape[0] != x.shape[0] or w.shape != idx.shape:
        return None, None
    return call, (consumer.weight, idx, w)


class FusedPairedPositionEmbedding(nn.Embedding):
    """Qwen3-VL's ``pos_embed`` paired with a fused patch embedding that already added the interpolated rows (same
    parameters). For the very index tensor of the armed call it returns zeros [N, taps, 1], so the parent's inline
    ``hidden + (pos_embed(idx) * w).sum(1)`` adds an exact zero by broadcasting (the [N, taps, D] gather, product and
    reduction are gone; the add remains, as fastvlm does not rewrite transformers' forward). Outside an armed call
    it is the plain lookup."""

    __module__ = "fastvlm.nn"

    def forward(self, input):
        call = call_of(self)
        if call is None or call.out is None or call.taps is None:
            return super().forward(input)
        call.out = None
        if input is call.taps[0]:
            return torch.zeros((*input.shape, 1), dtype=self.weight.dtype, device=input.device)
        # the positions are already in the patch embedding's rows: a second lookup would add them twice
        raise RuntimeError("fastvlm: the Qwen3-VL pairing expected pos_embed to receive the interpolation indices "
                           "it passed to the vision model's forward; this transformers version computes them "
                           "differently. fastvlm.unpatch(model) restores the model; please report the version.")


def _qwen3_taps(parent, grid_thw, kwargs):
    """transformers' own interpolation taps for this call (precomputed ones in ``kwargs`` are used as given)."""
    helper = sys.modules[type(parent).__module__].get_vision_interpolation_indices_and_weights
    return helper(grid_thw, num_grid_per_side=parent.num_grid_per_side, mode=parent.interpolation_mode,
                  align_corners=parent.interpolation_align_corners,
                  spatial_merge_size=parent.config.spatial_merge_size,
                  kwargs={k: kwargs[k] for k in ("interp_indices", "interp_weights") if k in kwargs})


def _qwen3_structure(parent):
    """Why a Qwen3-VL vision model's position code cannot be paired (empty when it can)."""
    mod = sys.modules[type(parent).__module__]
    if not hasattr(mod, "get_vision_interpolation_indices_and_weights") or hasattr(parent,
                                                                                   "fast_pos_embed_interpolate"):
        return ["this transformers version does not compute Qwen3-VL positions with "
                "get_vision_interpolation_indices_and_weights"]
    if type(parent.pos_embed) is not nn.Embedding:
        return [f"pos_embed is {type(parent.pos_embed).__name__}, not torch.nn.Embedding"]
    if has_hooks(parent.pos_embed):
        return ["pos_embed has forward hooks (they stay on the original module)"]
    return []
