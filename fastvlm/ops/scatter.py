"""``fastvlm::scatter_image_features``: the connector-to-LLM hand-off as one op.

transformers builds ``inputs_embeds`` from the token embeddings, checks that the number of image tokens matches the
connector's output rows, then ``masked_scatter``s the rows in. This op does the same in one pass, with the same check
and error message, and with autograd: the gradient flows to the text embeddings outside the image positions and to
the image features.

Two implementations, picked per call by this rule:

1. the ``backend`` argument when given: ``"auto"``, or ``"cuda"`` (alias ``"ext"``);
2. else ``FASTVLM_SCATTER`` (same values), unless ``FASTVLM_BACKEND=torch`` (the global PyTorch switch wins over it);
3. else ``"auto"``.

``"auto"`` (the default) is the ``fastvlm::scatter_image_features`` custom op: the Triton kernel on CUDA tensors,
``masked_scatter`` on the PyTorch path, chosen and reported like every fastvlm op (``FASTVLM_BACKEND``). The Triton
kernel needs no count from the host: it writes NaN instead of reading past the feature rows when there are more image
tokens than rows. The count (a device tensor) is then read *after* the launch (``check=True``: one synchronisation,
transformers' ValueError) or handed back unread (``check="lazy"``); the PyTorch path (``masked_scatter``, which
would fail on its own) checks it before.

``"cuda"`` is ``torch.ops.fastvlm_ext.scatter_image_features`` from the optional CUDA extension (csrc/scatter.cuh):
its CUDA kernel on CUDA tensors, its CPU implementation on CPU tensors. The count is checked **on the device**: the
kernels count the image tokens, write every image-token row as NaN instead of reading past the features when the
count differs from the number of feature rows, and return the count as a 0-dim int64 tensor; nothing in the kernel
path synchronises. The wrapper then reads that count *after* the launch (``check=True``: transformers' ValueError
before returning, one synchronisation at the end instead of one in the middle), or hands it back unread
(``check="lazy"``: ``(out, n_tokens)``, to be checked with ``check_token_count`` whenever a synchronisation is
cheap, e.g. after the forward). If the extension is unavailable, asking for it raises ``FastVLMFallbackError`` with
the reason (an explicit choice is never silently replaced).

Triton stays the default on CUDA: both kernels are one memory-bound pass over the rows, and the CUDA one becomes the
default only where a GPU measurement shows it faster (``python -m fastvlm.bench.scatter``; docs/design-csrc.md).
Under ``torch.compile`` no count is read on the host (the ``"cuda"`` path's NaN rows still mark a mismatch).
"""
from __future__ import annotations

import os

import torch

from fastvlm import _dispatch
from fastvlm.ops import compiled

OP_NAME = "fastvlm::scatter_image_features"
EXT_OP = "fastvlm_ext::scatter_image_features"
ENV = "FASTVLM_SCATTER"
BACKENDS = ("auto", "cuda", "ext")


def _reference(embeds, mask, features):
    return embeds.masked_scatter(mask[:, None].expand_as(embeds), features.to(embeds.dtype))


def _forward(embeds, mask, features):
    reasons = []
    if features.device != embeds.device:
        reasons.append(f"features are on {features.device} but inputs_embeds on {embeds.device}")
    detail = lambda: f"embeds{tuple(embeds.shape)} features{tuple(features.shape)}"  # noqa: E731
    if _dispatch.choose_backend(OP_NAME, embeds.device, reasons, detail) == "triton":
        from fastvlm.kernels.scatter import scatter_rows

        return scatter_rows(embeds, mask, features)
    return _reference(embeds, mask, features.to(embeds.device))


@torch.library.custom_op(OP_NAME, mutates_args=())
def scatter_image_features_op(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return _forward(embeds, mask, features)


@scatter_image_features_op.register_fake
def _(embeds, mask, features):
    return torch.empty_like(embeds)


def _setup(ctx, inputs, output):
    _, mask, features = inputs
    ctx.save_for_backward(mask)
    ctx.feat_dtype = features.dtype


def _backward(ctx, g):
    (mask,) = ctx.saved_tensors
    g_embeds = g.masked_fill(mask[:, None], 0)
    g_feat = g[mask].to(ctx.feat_dtype)
    return g_embeds, None, g_feat


scatter_image_features_op.register_autograd(_backward, setup_context=_setup)
compiled.register(scatter_image_features_op)  # its triton_op twin (fastvlm.ops.compiled)


# ---------------------------------------------------------------- backend rule and the count check


def requested_backend(backend=None) -> str:
    """"auto" or "cuda" for one call, by the rule in the module docstring."""
    if backend is None:
        value = _dispatch.getenv(ENV, "")
        value = value.strip().lower() or "auto" if value else "auto"
        if value not in BACKENDS:
            raise ValueError(f"{ENV} must be one of {BACKENDS}, got {value!r}")
        if value != "auto" and _dispatch.requested_backend() == "torch":
            return "auto"  # FASTVLM_BACKEND=torch: the PyTorch path, reported by the auto path
    else:
        value = str(backend).strip().lower()
        if value not in BACKENDS:
            raise ValueError(f"scatter_image_features: backend must be one of {BACKENDS} or None, got {backend!r}")
    return "cuda" if value in ("cuda", "ext") else "auto"


def _mismatch(n_tokens: int, n_features: int) -> ValueError:
    return ValueError(f"Image features and image tokens do not match, tokens: {n_tokens}, features: {n_features}")


def check_token_count(n_tokens, n_features: int) -> None:
    """Raise transformers' ValueError when ``n_tokens`` (an int or the 0-dim tensor that ``check="lazy"`` returns;
    reading a device tensor synchronises) differs from ``n_features``."""
    n = int(n_tokens)
    if n != int(n_features):
        raise _mismatch(n, int(n_features))


_ext_loaded = False  # set once the extension has loaded: later calls (and torch.compile) skip the loader


def _ext_op(why: str):
    global _ext_loaded
    if not _ext_loaded:
        from fastvlm import _cext  # not at import: `python -m fastvlm._cext` imports fastvlm first

        ok, reason = _cext.available(build=True)
        if not ok:
            raise _dispatch.FastVLMFallbackError(f"{why} but {EXT_OP} is unavailable: {reason}")
        _ext_loaded = True
    return torch.ops.fastvlm_ext.scatter_image_features


def scatter_image_features(inputs_embeds, image_mask, image_features, *, backend=None, check=True):
    """Return ``inputs_embeds`` with its image-token rows replaced by ``image_features`` rows, in order.

    inputs_embeds [B, S, D]; image_mask [B, S] (or [B, S, 1]) bool; image_features [N, D] or [..., D] with N rows.
    Raises ValueError, as transformers does, when the number of image tokens and feature rows differ.

    ``backend``: None (``FASTVLM_SCATTER``, else "auto"), "auto" (Triton on CUDA, PyTorch otherwise) or "cuda"
    (the CUDA extension's kernel, device-side count check); see the module docstring. ``check``: True (raise before
    returning) or "lazy": return ``(out, n_tokens)`` without reading the count on the host (the "cuda" backend;
    the "auto" backend has already checked it before its launch), for ``check_token_count(n_tokens, N)`` later.
    """
    if check is not True and check != "lazy":
        raise ValueError(f"scatter_image_features: check must be True or 'lazy', got {check!r}")
    which = requested_backend(backend)
    if image_mask.dim() == inputs_embeds.dim():
        image_mask = image_mask[..., 0]
    if image_mask.shape != inputs_embeds.shape[:-1]:
        raise ValueError(f"scatter_image_features: image_mask must be {tuple(inputs_embeds.shape[:-1])}, got "
                         f"{tuple(image_mask.shape)}")
    D = inputs_embeds.shape[-1]
    feats = image_features if image_features.dim() == 2 else image_features.reshape(-1, image_features.shape[-1])
    if feats.shape[-1] != D:
        raise ValueError(f"scatter_image_features: image_features rows have width {feats.shape[-1]}, inputs_embeds {D}")
    flat_mask = image_mask.reshape(-1)
    if flat_mask.dtype != torch.bool:
        flat_mask = flat_mask.to(torch.bool)
    compiling = torch.compiler.is_compiling()

    if which == "cuda":
        why = f"backend={backend!r}" if backend is not None else f"{ENV}={os.environ.get(ENV)}"
        op = _ext_op(why)
        if feats.device != inputs_embeds.device:
            feats = feats.to(inputs_embeds.device)
        _dispatch._record(_dispatch.OpRecord(EXT_OP, "fastvlm_ext", (),
                                             f"embeds{tuple(inputs_embeds.shape)} features{tuple(feats.shape)}"))
        out, n_tokens = op(inputs_embeds.reshape(-1, D), flat_mask, feats)
        out = out.reshape(inputs_embeds.shape)
        if check == "lazy":
            return out, n_tokens
        if not compiling:
            check_token_count(n_tokens, feats.shape[0])  # the one host read, after the kernels are queued
        return out

    embeds2 = inputs_embeds.reshape(-1, D)
    if compiling or (torch.is_grad_enabled() and (inputs_embeds.requires_grad or feats.requires_grad)):
        n_tokens = flat_mask.sum()
        if not compiling and not _kernel_path(inputs_embeds, feats):
            check_token_count(n_tokens, feats.shape[0])  # masked_scatter needs the count right: checked before
        torch._check(feats.shape[0] >= 0)
        op = compiled.op_for(OP_NAME, embeds2, (("image_features", feats),)) if compiling \
            else torch.ops.fastvlm.scatter_image_features
        out = op(embeds2, flat_mask, feats)
    else:  # eager without autograd: the op's implementation directly (no dispatcher), the count from its cumsum
        out, n_tokens = _forward_counted(embeds2, flat_mask, feats)
    out = out.reshape(inputs_embeds.shape)
    if check == "lazy":
        return out, n_tokens
    if not compiling:
        check_token_count(n_tokens, feats.shape[0])  # after the launch (the kernel never reads past the rows)
    return out


def _forward_counted(embeds, mask, features):
    """(out, image-token count as a 0-dim device tensor): ``_forward`` that also hands back the count. The kernel
    path reads it off its own cumulative sum (no extra pass); the PyTorch path checks it before masked_scatter."""
    reasons = []
    if features.device != embeds.device:
        reasons.append(f"features are on {features.device} but inputs_embeds on {embeds.device}")
    detail = lambda: f"embeds{tuple(embeds.shape)} features{tuple(features.shape)}"  # noqa: E731
    if _dispatch.choose_backend(OP_NAME, embeds.device, reasons, detail) == "triton" and embeds.shape[0]:
        from fastvlm.kernels.scatter import scatter_rows

        csum = torch.cumsum(mask, 0, dtype=torch.int64)
        return scatter_rows(embeds, mask, features, csum), csum[-1]
    n_tokens = mask.sum()
    check_token_count(n_tokens, features.shape[0])
    return _reference(embeds, mask, features.to(embeds.device)), n_tokens


def _kernel_path(embeds, feats):
    """Whether the custom op will run its Triton kernel (which guards the count itself) rather than masked_scatter.
    A quiet look: the op's own call reports the choice."""
    return (_dispatch.requested_backend() != "torch" and feats.device == embeds.device
            and not _dispatch.environment_reasons(embeds.device))
