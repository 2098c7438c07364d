"""Probe inputs: random forward arguments shaped as each family's caller passes them (``fastvlm.patch(verify=True)``,
the pairings' verification, ``fastvlm check``). A module of its own so that fastvlm/nn and fastvlm/integrations both
import it without importing each other."""
from __future__ import annotations

import torch


def probe_args(recipe, fused):
    """Random forward arguments shaped as the family's caller passes them, on the module's device and dtype."""
    p = next(iter(fused.parameters()), None)
    dev, dt = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    rand = lambda *shape: torch.randn(*shape, device=dev, dtype=dt)  # noqa: E731
    if getattr(recipe, "qformer", False):  # a Q-Former: positional (query_embeds, ..., encoder_hidden_states)
        return fused._fastvlm_probe_args()
    if recipe.fused_name == "FusedLlavaNextVideoPooler":
        k = fused.pool.kernel_size if isinstance(fused.pool.kernel_size, int) else fused.pool.kernel_size[0]
        width = fused.pool.in_channels if isinstance(fused.pool, torch.nn.Conv2d) else 16
        return (rand(2, (2 * k) ** 2, width),)
    if getattr(recipe, "role", None) in ("resampler", "connector"):  # Idefics2's Perceiver: (context, patch mask)
        width = (fused.modality_projection.gate_proj.in_features if recipe.role == "connector"
                 else fused.latents.shape[1])
        mask = torch.ones(2, 6, dtype=torch.bool, device=dev)
        mask[1, 4:] = False
        return rand(2, 6, width), mask
    if hasattr(recipe, "kind"):  # a patch embedding
        conv = fused.get_submodule(recipe.conv)
        if recipe.kind == "unfold":  # Llama 4: Unfold + Linear
            k = fused.unfold.kernel_size
            p = k if isinstance(k, int) else k[0]
            return (rand(2, conv.in_features // (p * p), 2 * p, 3 * p),)
        if recipe.kind == "rows":
            return (rand(8, conv.weight[0].numel()),)
        if recipe.kind == "navit":  # a padded batch: the second image covers 2 x 3 of the 3 x 4 patch grid
            p = conv.kernel_size[0]
            mask = torch.ones(2, 3, 4, dtype=torch.bool, device=dev)
            mask[1, 2:] = False
            mask[1, :, 3:] = False
            return rand(2, conv.in_channels, 3 * p, 4 * p), mask
        side = getattr(fused, "image_size", 2 * conv.kernel_size[0])
        side = side[0] if isinstance(side, (tuple, list)) else side  # (InternVL keeps a pair)
        if recipe.kind == "timm":
            side = fused.img_size[0] if fused.img_size is not None else 2 * conv.kernel_size[0]
        return (rand(2, conv.in_channels, side, side),)
    if recipe.merged_width:
        return (rand(16, getattr(fused, recipe.merged_width) // 4),)
    if recipe.merge == "avg_pool":
        side = fused.patches_per_image
        return (rand(2, side * side, getattr(fused, recipe.weight_in_out).shape[0]),)
    if recipe.merge in ("pixel_shuffle", "unfold"):
        s = fused._fastvlm_scale()
        first = fused.get_submodule(recipe.merger or recipe.linear_1)
        width = first.in_features // (s * s)
        if recipe.merge == "unfold":
            side = 2 * s * fused.patch_merger.patch_size
            return rand((2 * s) ** 2, width), torch.tensor([[side, side]], device=p.device)
        return (rand(2, (2 * s) ** 2, width),)
    return (rand(2, 5, fused.get_submodule(recipe.linear_1).in_features),)
