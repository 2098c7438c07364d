"""Plain-PyTorch reference connectors for convolutional feature maps, written from the papers' descriptions.

* ``CAbstractor`` (Honeybee, Cha et al. 2024, "C-Abstractor"): the vision tokens [B, L, C] (+ a learned position
  embedding) are viewed as a map, pass L residual bottleneck blocks, adaptive average pooling to a fixed number of
  tokens (the "abstraction"), L more residual blocks, then a projection MLP (Linear-SiLU-Linear) into the LLM width.
  The blocks are ResNet-style bottlenecks (1x1 -> 3x3 -> 1x1 convolutions) with a channel LayerNorm, SiLU and an
  optional squeeze-excitation, as the paper's RegNet-based implementation describes.
* ``LDPv2Projector`` (MobileVLM V2, Chu et al. 2024, "LDPv2"): a Linear-GELU-Linear MLP on every token, 2x2 (in
  general: adaptive, to a fixed grid) average pooling over the token grid, then a position-encoding generator: a
  depthwise 3x3 convolution whose output is added back to its input (residual).

These are the modules a checkpoint is trained with; fastvlm.nn.feature_map builds the fast modules from them
(``from_module``) with identical parameters and state_dict keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def grid_of(num_tokens, what="tokens"):
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} {what} do not form a square grid")
    return side


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (each pixel normalised on its own)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Channel gating: global average -> 1x1 conv (reduce) -> SiLU -> 1x1 conv (expand) -> sigmoid -> scale."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class ResBottleneck(nn.Module):
    """Residual bottleneck: 1x1 conv -> LN -> SiLU -> 3x3 conv -> LN -> SiLU -> [SE] -> 1x1 conv -> LN, plus the
    shortcut (identity, or 1x1 conv + LN when the width changes), then SiLU. Convolutions have no bias (the norm
    follows each one)."""

    def __init__(self, in_dim, out_dim, bottle_ratio=1.0, se_ratio=0.25):
        super().__init__()
        mid = max(1, int(round(out_dim * bottle_ratio)))
        self.conv1 = nn.Conv2d(in_dim, mid, 1, bias=False)
        self.norm1 = LayerNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(mid)
        self.se = SqueezeExcite(mid, max(1, int(round(in_dim * se_ratio)))) if se_ratio else nn.Identity()
        self.conv3 = nn.Conv2d(mid, out_dim, 1, bias=False)
        self.norm3 = LayerNorm2d(out_dim)
        if in_dim != out_dim:
            self.shortcut = nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, bias=False), LayerNorm2d(out_dim))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        y = F.silu(self.norm1(self.conv1(x)))
        y = F.silu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(self.se(y)))
        return F.silu(y + self.shortcut(x))


def _stage(depth, in_dim, out_dim):
    return nn.Sequential(*[ResBottleneck(in_dim if i == 0 else out_dim, out_dim) for i in range(depth)])


def _mlp(depth, in_dim, out_dim):
    layers = [nn.Linear(in_dim, out_dim)]
    for _ in range(1, depth):
        layers += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor: tokens [B, L, in_dim] -> [B, num_queries, out_dim].

    ``num_input_tokens`` L must be a square grid (the class token, if any, is removed by the caller);
    ``num_queries`` a square too (the pooled grid). ``depth`` blocks before and after the pooling (0 allowed),
    ``mlp_depth`` Linear layers in the readout (SiLU between them).
    """

    def __init__(self, in_dim, hidden_dim, out_dim, num_input_tokens=576, num_queries=144, depth=3, mlp_depth=2,
                 pos_emb=True):
        super().__init__()
        self.num_input_tokens = num_input_tokens
        self.num_queries = num_queries
        self.in_side = grid_of(num_input_tokens, "input tokens")
        self.out_side = grid_of(num_queries, "queries")
        self.pos_emb = nn.Parameter(torch.zeros(1, num_input_tokens, in_dim)) if pos_emb else None
        if pos_emb:
            nn.init.trunc_normal_(self.pos_emb, std=0.02)
        self.stage1 = _stage(depth, in_dim, hidden_dim)
        self.sampler = nn.AdaptiveAvgPool2d((self.out_side, self.out_side))
        self.stage2 = _stage(depth, hidden_dim if depth else in_dim, hidden_dim)
        self.readout = _mlp(mlp_depth, hidden_dim if depth else in_dim, out_dim)

    def forward(self, x):
        B, L, C = x.shape
        if self.pos_emb is not None:
            x = x + self.pos_emb
        m = x.transpose(1, 2).reshape(B, C, self.in_side, self.in_side)
        m = self.stage2(self.sampler(self.stage1(m)))
        return self.readout(m.flatten(2).transpose(1, 2))


class PosInject(nn.Module):
    """Position-encoding generator: a depthwise 3x3 convolution (with bias) added to its input."""

    def __init__(self, dim):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

    def forward(self, m):
        return self.peg(m) + m


class LDPv2Projector(nn.Module):
    """MobileVLM V2's lightweight downsample projector: tokens [B, L, in_dim] -> [B, num_queries, out_dim].

    MLP (Linear-GELU-Linear) per token -> adaptive average pooling of the (sqrt L)^2 grid to (sqrt Q)^2 (2x2 pooling
    for 576 -> 144) -> depthwise 3x3 position encoding with residual.
    """

    def __init__(self, in_dim, out_dim, num_queries=144):
        super().__init__()
        self.num_queries = num_queries
        self.out_side = grid_of(num_queries, "queries")
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.pool = nn.AdaptiveAvgPool2d((self.out_side, self.out_side))
        self.peg = PosInject(out_dim)

    def forward(self, x):
        B, L, _ = x.shape
        side = grid_of(L)
        y = self.mlp(x)
        m = self.pool(y.transpose(1, 2).reshape(B, -1, side, side))
        return self.peg(m).flatten(2).transpose(1, 2)


def feature_map_projector_ref(x, w1, b1=None, w2=None, b2=None, act="none", act2="none", pool=(1, 1)):
    """Eager glue + MLP: ``act2(linear_2(act(linear_1(avg_pool2d(x, pool).flatten(2).transpose(1, 2)))))``."""
    from fastvlm.reference.activations import act_ref

    if pool[0] * pool[1] > 1:
        x = F.avg_pool2d(x, pool)
    y = act_ref(F.linear(x.flatten(2).transpose(1, 2), w1, b1), act)
    if w2 is not None:
        y = act_ref(F.linear(y, w2, b2), act2)
    return y
