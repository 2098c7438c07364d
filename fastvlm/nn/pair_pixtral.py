"""The Pixtral pairing: ``patch_conv`` as fastvlm's patch GEMM with its parent's ``ln_pre`` (an RMSNorm) applied to
every row in the same op call; the paired ``ln_pre`` passes the parent's concatenation of those rows through.
Per-call data (the open call, the image sizes, the handed-over rows) lives in the call (fastvlm/nn/pair_state.py).
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn

from fastvlm._cache import shared_cache
from fastvlm.nn.pair_state import call_of, hand_off, has_hooks, taken
from fastvlm.ops.patch_embed import patch_embed


class FusedPixtralPatchConv(nn.Conv2d):
    """Pixtral's ``patch_conv`` paired with its parent's ``ln_pre`` (same parameters). Inside an armed
    ``PixtralVisionModel.forward`` it runs the conv as fastvlm's patch GEMM with the RMSNorm applied to every row right
    after it (a per-row op, so normalising before the parent's per-image crop and concatenation gives the same rows)
    and returns the [B, D, H', W'] result as a view of channels-last rows, so the parent's ``flatten(1).T`` and
    ``torch.cat`` copy rows instead of transposing; the paired ``ln_pre`` then passes that concatenation through.
    In a padded batch only the patches inside each image's ``image_sizes`` are computed (the parent crops the
    rest away). Called any other way it is the original convolution."""

    __module__ = "fastvlm.nn"

    def forward(self, input):
        call = taken(self)  # one fused call per armed forward
        norm = None
        if call is not None:
            pair = call.pair
            ln = getattr(pair.parent, pair.norm_attr)
            if (ln is pair.norm and getattr(pair.parent, "patch_conv", None) is self and not has_hooks(self, ln)
                    and ln.weight.dtype == self.weight.dtype and ln.weight.shape == (self.out_channels,)):
                norm = dict(norm_weight=ln.weight, eps=ln.variance_epsilon)
        p = self.kernel_size[0]
        if (norm is None or not isinstance(input, torch.Tensor) or input.dim() != 4
                or input.shape[1] != self.in_channels or input.shape[2] < p or input.shape[3] < p
                or input.dtype != self.weight.dtype or input.device != self.weight.device
                or (self.bias is not None and self.bias.dtype != self.weight.dtype)):
            return super().forward(input)
        B, C, H, W = input.shape
        gh, gw = H // p, W // p
        x = input if (H % p == 0 and W % p == 0) else input[:, :, :gh * p, :gw * p]
        keep = _pixtral_keep(call.taps, B, gh, gw, p, input.device)  # the patches the parent's crop keeps
        out = patch_embed(x, self.weight, self.bias, norm_weight=norm["norm_weight"], eps=norm["eps"], norm_rms=True,
                          keep_rows=keep)
        hand_off(call, out)
        return out.view(B, gh, gw, -1).permute(0, 3, 1, 2)


def _pixtral_keep(sizes, B, gh, gw, p, device):
    """Indices of the patches PixtralVisionModel.forward keeps (``[:h // p, :w // p]`` of each image), or None when
    it keeps them all, the sizes are unknown, or the call is being traced (data-dependent sizes)."""
    if sizes is None or torch.compiler.is_compiling():
        return None
    try:
        hw = [(int(h), int(w)) for h, w in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)]
    except (TypeError, ValueError):
        return None
    if len(hw) != B:
        return None
    grid = tuple((min(h // p, gh), min(w // p, gw)) for h, w in hw)
    if all(g == (gh, gw) for g in grid):
        return None
    return _keep_table(grid, gh, gw, str(device))


@shared_cache(32)
def _keep_table(grid, gh, gw, device):
    dev = torch.device(device)
    parts = [b * gh * gw + (torch.arange(h, device=dev)[:, None] * gw + torch.arange(w, device=dev)).reshape(-1)
             for b, (h, w) in enumerate(grid)]
    return torch.cat(parts)


_PAIRED_RMS = {}
_class_lock = threading.Lock()  # one class object per base, even when two threads patch at once (pickling needs it)


def _paired_rms_class(base):
    """``PixtralRMSNorm`` subclass that passes the armed call's (already normalised) rows through."""
    with _class_lock:
        cls = _PAIRED_RMS.get(base)
        if cls is None:
            cls = _PAIRED_RMS[base] = _make_paired_rms_class(base)
    return cls


def _make_paired_rms_class(base):
    def forward(self, hidden_states):
        call = call_of(self)
        if call is None or call.pair.kind != "pixtral" or not call.norm_fused or call.out is None:
            return base.forward(self, hidden_states)
        done = call.out
        call.out = None
        # the fused conv checked the hooks and dtypes before it normalised; here the rows must be its output,
        # cropped and concatenated by PixtralVisionModel.forward: [1, tokens, D] in its dtype
        if (isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3 and hidden_states.shape[0] == 1
                and hidden_states.shape[-1] == done.shape[-1] and hidden_states.dtype == done.dtype
                and hidden_states.shape[1] <= done.shape[0] * done.shape[1]):
            return hidden_states
        # normalising again would be silently wrong: this transformers version calls ln_pre differently
        raise RuntimeError(
            "fastvlm: the Pixtral pairing expected ln_pre to receive the concatenated rows [1, tokens, "
            f"{done.shape[-1]}] of the fused patch conv, got {tuple(getattr(hidden_states, 'shape', ()))}; this "
            "transformers version's PixtralVisionModel.forward differs. fastvlm.unpatch(model) restores it; "
            "please report the version.")

    return type(f"FusedPaired{base.__name__}", (base,), {
        "forward": forward, "__module__": "fastvlm.nn",
        "__doc__": f"``{base.__name__}`` paired with a fused patch conv that applies it (same parameters)."})


def _pixtral_structure(conv, norm):
    reasons = []
    if type(conv) is not nn.Conv2d:
        reasons.append(f"patch_conv is {type(conv).__name__}, not torch.nn.Conv2d")
    else:
        padded = any(conv.padding) if isinstance(conv.padding, tuple) else conv.padding != "valid"
        if (conv.kernel_size[0] != conv.kernel_size[1] or conv.stride != conv.kernel_size or conv.groups != 1
                or padded or any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros"):
            reasons.append("patch_conv is not a square stride == kernel convolution (no padding, groups, dilation)")
    if (type(norm).__name__ != "PixtralRMSNorm" or getattr(norm, "weight", None) is None
            or not hasattr(norm, "variance_epsilon")):
        reasons.append(f"ln_pre is {type(norm).__name__}, not PixtralRMSNorm")
    if has_hooks(conv) or has_hooks(norm):
        reasons.append("patch_conv or ln_pre has forward hooks (they stay on the original modules)")
    return reasons
