"""``fastvlm.patch(model, verify=True)`` for the embedding pairings: one armed call on a random probe against the
unfused chain (the plain embedding, then the original position code and pre-norm), reported as a relative error
against fastvlm's bound for the dtype and reduction length."""
from __future__ import annotations

import torch
import torch.nn as nn

from fastvlm.nn.pair_prenorm import _PosEmbedConsumer
from fastvlm.nn.pair_qwen3 import _qwen3_taps
from fastvlm.nn.probe import probe_args


def _verdict(got, ref, dtype, k):
    """The report's verify text: relative error against fastvlm's bound for ``dtype`` and reduction length ``k``."""
    from fastvlm.testing import rel_err, tolerance

    err = rel_err(got, ref)
    bound = tolerance(dtype, k, roundings=3)
    ok = got.shape == ref.shape and err <= bound
    return f"verify: rel err {err:.2e} (bound {bound:.2e}) {'ok' if ok else 'MISMATCH'}"


def verify_pair(pair, parent, embed, original_norm, kind):
    """Armed fused tokens vs the unfused chain (the plain embedding, the original position code and pre-norm)."""
    x = probe_args(embed._fastvlm_recipe, embed)[0]
    if x.device.type == "meta":
        return "verify skipped: parameters are on the meta device"
    with torch.no_grad():
        with pair.arm():
            got = embed(x) if kind == "clip" else _PosEmbedConsumer(parent, pair)(embed(x))
        if kind == "clip":
            ref = original_norm(embed(x))
        else:
            ref = original_norm(parent.patch_drop(type(parent)._pos_embed(parent, embed(x))))
    return _verdict(got, ref, x.dtype, embed.get_submodule(embed._fastvlm_recipe.conv).weight[0].numel())


def verify_pixtral(pair, conv, original_norm):
    """Armed fused conv + pass-through ln_pre vs the original conv and RMSNorm, on a probe of 2 x 3 patches."""
    w = conv.weight
    if w.device.type == "meta":
        return "verify skipped: parameters are on the meta device"
    p = conv.kernel_size[0]
    x = torch.randn(1, conv.in_channels, 2 * p, 3 * p, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        with pair.arm():
            got = pair.norm(conv(x).flatten(2).transpose(1, 2))
        ref = original_norm(nn.Conv2d.forward(conv, x).flatten(2).transpose(1, 2))
    return _verdict(got, ref, x.dtype, w[0].numel())


def verify_qwen3(pair, parent, embed, original_pos):
    """Armed fused rows (positions added in the GEMM) vs the plain embedding plus the original position code."""
    conv = embed.proj
    if conv.weight.device.type == "meta":
        return "verify skipped: parameters are on the meta device"
    m = parent.config.spatial_merge_size
    grid = torch.tensor([[1, 2 * m, 3 * m]], device=conv.weight.device)
    x = torch.randn(6 * m * m, conv.weight[0].numel(), device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        idx, w = _qwen3_taps(parent, grid, {})
        with pair.arm((idx, w)):
            got = embed(x)
            got = got + (pair.norm(idx) * w[:, :, None]).sum(1).to(got.dtype)
        plain = embed(x)
        ref = plain + (original_pos(idx) * w[:, :, None]).sum(1).to(plain.dtype)
    return _verdict(got, ref, x.dtype, x.shape[1])
