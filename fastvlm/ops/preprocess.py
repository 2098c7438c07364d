"""Image preprocessing on the GPU: uint8 HWC images -> rescale + mean/std normalisation -> the vision encoder's input.

Hugging Face image processors resize, then rescale and normalise on the CPU and ship float32 pixels to the GPU.
These functions take the uint8 pixels after the resize (4x fewer bytes to move) and do the float work in one pass:

* ``normalize_images``: NCHW tiles ``[N, C, H, W]`` (CLIP / LLaVA, SigLIP, AnyRes tiles and crops of one size;
  smaller images are placed top-left and padded);
* ``qwen2vl_patchify``: Qwen2-VL's pre-patchified rows ``[sum(t*h*w), C * temporal_patch_size * patch_size**2]``
  with its merge-window row order and the temporal duplication of still images (the repeat of a video's last
  frame up to a multiple of ``temporal_patch_size``), plus ``image_grid_thw``.

No resizing, cropping or RGB conversion: feed images the processor would not resize (or resize them first).
The arithmetic is the torchvision processors' (``(x - mean/rescale) / (std/rescale)`` in fp32, each step rounded),
so the outputs equal ``CLIPImageProcessor``, ``SiglipImageProcessor`` and ``Qwen2VLImageProcessor`` bit for bit;
bf16/fp16 outputs are that fp32 value rounded to nearest even, as ``pixel_values.to(dtype)`` gives.

Input: a uint8 tensor ``[N, H, W, C]`` (or ``[H, W, C]``), a list of ``[H, W, C]`` tensors or arrays of any sizes
(``[F, H, W, C]`` for a video in ``qwen2vl_patchify``), or one flat uint8 buffer with ``sizes=[(H, W), ...]``
(and optionally ``offsets`` in bytes and ``frames``): e.g. decoded straight into pinned memory and moved with one
copy (``device="cuda"``). Backends: the ``fastvlm_ext`` CUDA kernel on CUDA tensors (the extension is built on
first use, see fastvlm/_cext.py); the plain-PyTorch path otherwise, reported through ``fastvlm.trace()`` and a
``FastVLMFallbackWarning`` like every fastvlm op. ``backend="ext"`` forces the extension (its CPU implementation
on CPU tensors), ``backend="torch"`` the PyTorch path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastvlm import _cext, _dispatch

OP_TILES = "fastvlm_ext::normalize_tiles"
OP_PATCHIFY = "fastvlm_ext::qwen2vl_patchify"
MAX_EXT_CHANNELS = 4
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class PackedImages:
    """Images in one flat uint8 buffer: image i is ``frames[i]`` HWC frames of ``sizes[i]`` at byte ``offsets[i]``."""

    data: torch.Tensor
    offsets: list[int]
    sizes: list[tuple[int, int]]
    frames: list[int]
    channels: int

    def __len__(self):
        return len(self.sizes)


def _as_uint8(x, what):
    if not isinstance(x, torch.Tensor):
        import numpy as np

        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype != torch.uint8:
        raise TypeError(f"{what} must be uint8 (the pixels after the processor's resize), got {x.dtype}")
    return x


def pack_images(images, *, sizes=None, offsets=None, frames=None, channels=None, allow_video=False) -> PackedImages:
    """Normalise the accepted input forms (see the module docstring) into one flat buffer plus per-image metadata."""
    if isinstance(images, PackedImages):
        return images
    if isinstance(images, (list, tuple)):
        if sizes is not None or offsets is not None:
            raise ValueError("sizes/offsets describe a flat buffer; a list of images carries its own sizes")
        if not images:
            raise ValueError("no images")
        imgs = [_as_uint8(im, f"images[{i}]") for i, im in enumerate(images)]
        fr, sz = [], []
        for i, im in enumerate(imgs):
            if im.dim() == 4 and allow_video:
                fr.append(im.shape[0])
            elif im.dim() == 3:
                fr.append(1)
            else:
                raise ValueError(f"images[{i}] must be [H, W, C]{' or [F, H, W, C]' if allow_video else ''}, got "
                                 f"shape {tuple(im.shape)}")
            sz.append((int(im.shape[-3]), int(im.shape[-2])))
        chans = {int(im.shape[-1]) for im in imgs}
        if len(chans) != 1:
            raise ValueError(f"all images must have the same number of channels, got {sorted(chans)}")
        if frames is not None:
            raise ValueError("frames describe a flat buffer; give a video as an [F, H, W, C] list item")
        data = torch.cat([im.reshape(-1) for im in imgs])
        offs = [0]
        for im in imgs[:-1]:
            offs.append(offs[-1] + im.numel())
        return PackedImages(data, offs, sz, fr, chans.pop())
    images = _as_uint8(images, "images")
    if images.dim() in (3, 4):
        if sizes is not None or offsets is not None:
            raise ValueError("sizes/offsets describe a flat (1-D) buffer, images is "
                             f"{images.dim()}-D")
        batch = images if images.dim() == 4 else images[None]
        n, h, w, c = batch.shape
        fr = [1] * n if frames is None else list(frames)
        if sum(fr) != n or len(fr) == 0:
            raise ValueError(f"frames {fr} must sum to the batch size {n}")
        offs, acc = [], 0
        for f in fr:
            offs.append(acc)
            acc += f * h * w * c
        return PackedImages(batch.contiguous().reshape(-1), offs, [(h, w)] * len(fr), fr, c)
    if images.dim() != 1:
        raise ValueError(f"images must be [N, H, W, C], [H, W, C], a list, or a flat 1-D buffer; got {images.dim()}-D")
    if sizes is None or channels is None:
        raise ValueError("a flat buffer needs sizes=[(H, W), ...] and channels=")
    sz = [(int(h), int(w)) for h, w in sizes]
    fr = [1] * len(sz) if frames is None else [int(f) for f in frames]
    if len(fr) != len(sz):
        raise ValueError(f"{len(fr)} frame counts for {len(sz)} images")
    if offsets is None:
        offs, acc = [], 0
        for (h, w), f in zip(sz, fr):
            offs.append(acc)
            acc += f * h * w * channels
    else:
        offs = [int(o) for o in offsets]
        if len(offs) != len(sz):
            raise ValueError(f"{len(offs)} offsets for {len(sz)} images")
    return PackedImages(images.contiguous(), offs, sz, fr, int(channels))


def _check_bounds(p: PackedImages):
    n = p.data.numel()
    for i, ((h, w), off, f) in enumerate(zip(p.sizes, p.offsets, p.frames)):
        if h <= 0 or w <= 0 or f <= 0 or off < 0 or off + f * h * w * p.channels > n:
            raise ValueError(f"image {i} ({f} frame(s) of {h}x{w}x{p.channels} at byte {off}) does not fit in the "
                             f"{n}-byte buffer")


def norm_constants(mean, std, channels, rescale_factor=1 / 255, do_rescale=True, do_normalize=True):
    """(scale, sub, div) with out = (x * scale - sub) / div, each as the fp32 values transformers' torchvision
    processors use: rescale is folded into the normalisation (sub = mean / rescale_factor) as they do."""
    def per_channel(v, name):
        vals = [float(v)] * channels if isinstance(v, (int, float)) else [float(x) for x in v]
        if len(vals) != channels:
            raise ValueError(f"{name} has {len(vals)} values for {channels} channels")
        return vals

    if do_normalize:
        mean_t = torch.tensor(per_channel(mean, "mean"))
        std_t = torch.tensor(per_channel(std, "std"))
        if do_rescale:
            mean_t = mean_t * (1.0 / rescale_factor)
            std_t = std_t * (1.0 / rescale_factor)
        return 1.0, mean_t.tolist(), std_t.tolist()
    scale = float(rescale_factor) if do_rescale else 1.0
    return scale, [0.0] * channels, [1.0] * channels


def _normalize_ref(u8_hwc, scale, sub, div):
    x = u8_hwc.to(torch.float32)
    if scale != 1.0:
        x = x * scale
    sub_t = torch.tensor(sub, dtype=torch.float32, device=x.device)
    div_t = torch.tensor(div, dtype=torch.float32, device=x.device)
    return (x - sub_t) / div_t


# ---------------------------------------------------------------- backend choice


def _choose(op: str, device: torch.device, backend, reasons: list[str], detail: str) -> str:
    """"ext" (the fastvlm_ext op) or "torch" (the PyTorch path), recorded in fastvlm.trace()."""
    backend = (backend or "auto").lower()
    if backend not in ("auto", "ext", "torch"):
        raise ValueError(f"backend must be 'auto', 'ext' or 'torch', got {backend!r}")
    if backend == "torch" or (backend == "auto" and _dispatch.requested_backend() == "torch"):
        _dispatch.report_fallback(op, (f"backend={backend}" if backend == "torch" else "FASTVLM_BACKEND=torch",),
                                  detail, explicit=True)
        return "torch"
    if backend == "auto" and device.type != "cuda":
        reasons = reasons + [f"tensors are on {device.type}: the fastvlm_ext kernel runs on CUDA tensors "
                             "(backend='ext' runs its CPU implementation)"]
    if not reasons:
        ok, why = _cext.available(build=True)
        if not ok:
            reasons = [f"CUDA extension unavailable: {why}"]
    if not reasons:
        _dispatch._record(_dispatch.OpRecord(op, "fastvlm_ext", (), detail))
        return "ext"
    if backend == "ext" or _dispatch.requested_backend() == "triton":
        why = "backend='ext'" if backend == "ext" else "FASTVLM_BACKEND=triton"
        raise _dispatch.FastVLMFallbackError(f"{why} but {op} cannot run its fastvlm_ext kernel:\n"
                                             + "\n".join(f"  - {r}" for r in reasons))
    _dispatch.report_fallback(op, reasons, detail)
    return "torch"


def _prepare(images, sizes, offsets, frames, channels, device, allow_video):
    p = pack_images(images, sizes=sizes, offsets=offsets, frames=frames, channels=channels, allow_video=allow_video)
    _check_bounds(p)
    dev = torch.device(device) if device is not None else p.data.device
    if p.data.device != dev:
        p.data = p.data.to(dev, non_blocking=True)
    return p, dev


def _ext_reasons(p: PackedImages, dtype) -> list[str]:
    reasons = []
    if p.channels > MAX_EXT_CHANNELS:
        reasons.append(f"{p.channels} channels: the fastvlm_ext kernels take 1 to {MAX_EXT_CHANNELS}")
    if dtype not in OUT_DTYPES:
        reasons.append(f"dtype {dtype} (the kernels write float32, bfloat16 or float16)")
    return reasons


# ---------------------------------------------------------------- NCHW tiles


def normalize_images(images, mean, std, *, sizes=None, offsets=None, channels=None, rescale_factor=1 / 255,
                     do_rescale=True, do_normalize=True, out_size=None, pad_value=0.0, dtype=torch.float32,
                     device=None, backend=None) -> torch.Tensor:
    """uint8 HWC images -> normalised ``[N, C, H, W]`` in ``dtype``, as a torchvision image processor after its
    resize (and center crop). ``out_size=(H, W)`` defaults to the largest image; smaller images sit top-left and
    the rest is ``pad_value`` (in output units). See the module docstring for the input forms."""
    p, dev = _prepare(images, sizes, offsets, None, channels, device, allow_video=False)
    if any(f != 1 for f in p.frames):
        raise ValueError("normalize_images takes still images (frames=1)")
    out_h, out_w = (max(h for h, _ in p.sizes), max(w for _, w in p.sizes)) if out_size is None else out_size
    for i, (h, w) in enumerate(p.sizes):
        if h > out_h or w > out_w:
            raise ValueError(f"image {i} is {h}x{w}, larger than the {out_h}x{out_w} output (no resizing here)")
    scale, sub, div = norm_constants(mean, std, p.channels, rescale_factor, do_rescale, do_normalize)
    detail = f"{len(p)} images -> [{len(p)}, {p.channels}, {out_h}, {out_w}] {str(dtype).replace('torch.', '')}"
    if _choose(OP_TILES, dev, backend, _ext_reasons(p, dtype), detail) == "ext":
        meta = torch.tensor([[o, h, w] for o, (h, w) in zip(p.offsets, p.sizes)], dtype=torch.int64)
        return torch.ops.fastvlm_ext.normalize_tiles(p.data, meta.to(dev, non_blocking=True), sub, div, scale,
                                                     int(out_h), int(out_w), float(pad_value), dtype)
    out = torch.full((len(p), p.channels, out_h, out_w), float(pad_value), dtype=torch.float32, device=dev)
    for i, ((h, w), off) in enumerate(zip(p.sizes, p.offsets)):
        img = p.data[off:off + h * w * p.channels].view(h, w, p.channels)
        out[i, :, :h, :w] = _normalize_ref(img, scale, sub, div).permute(2, 0, 1)
    return out.to(dtype)


# ---------------------------------------------------------------- Qwen2-VL rows


def qwen2vl_grid(size, frames=1, patch_size=14, merge_size=2, temporal_patch_size=2) -> tuple[int, int, int]:
    """(grid_t, grid_h, grid_w) of one image or video; H and W must be multiples of patch_size * merge_size."""
    h, w = size
    factor = patch_size * merge_size
    if h % factor or w % factor:
        raise ValueError(f"image of {h}x{w}: height and width must be multiples of patch_size * merge_size = "
                         f"{factor} (resize with the processor's smart_resize first)")
    return math.ceil(frames / temporal_patch_size), h // patch_size, w // patch_size


def qwen2vl_patchify(images, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), *,
                     sizes=None, offsets=None, frames=None, channels=None, patch_size=14, merge_size=2,
                     temporal_patch_size=2, rescale_factor=1 / 255, do_rescale=True, do_normalize=True,
                     dtype=torch.float32, device=None, backend=None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 HWC images (or [F, H, W, C] videos) -> (``pixel_values`` [rows, C*T*P*P], ``image_grid_thw`` [N, 3]
    int64), the rows in Qwen2VLImageProcessor's order (``Qwen2VLVideoProcessor``'s for videos), both on the output
    device. Defaults are Qwen2-VL's (CLIP mean/std, patch 14, merge 2, temporal 2)."""
    p, dev = _prepare(images, sizes, offsets, frames, channels, device, allow_video=True)
    grids = [qwen2vl_grid(s, f, patch_size, merge_size, temporal_patch_size) for s, f in zip(p.sizes, p.frames)]
    counts = [t * h * w for t, h, w in grids]
    total = sum(counts)
    width = p.channels * temporal_patch_size * patch_size * patch_size
    scale, sub, div = norm_constants(mean, std, p.channels, rescale_factor, do_rescale, do_normalize)
    grid_thw = torch.tensor(grids, dtype=torch.int64).to(dev, non_blocking=True)
    detail = f"{len(p)} images -> [{total}, {width}] {str(dtype).replace('torch.', '')}"
    if _choose(OP_PATCHIFY, dev, backend, _ext_reasons(p, dtype), detail) == "ext":
        rows, meta = 0, []
        for (h, w), off, f, n in zip(p.sizes, p.offsets, p.frames, counts):
            meta.append([off, h, w, f, rows])
            rows += n
        meta = torch.tensor(meta, dtype=torch.int64).to(dev, non_blocking=True)
        out = torch.ops.fastvlm_ext.qwen2vl_patchify(p.data, meta, sub, div, scale, patch_size, merge_size,
                                                     temporal_patch_size, total, dtype)
        return out, grid_thw
    C, T, P, M = p.channels, temporal_patch_size, patch_size, merge_size
    pieces = []
    for (h, w), off, f, (gt, gh, gw) in zip(p.sizes, p.offsets, p.frames, grids):
        x = p.data[off:off + f * h * w * C].view(f, h, w, C)
        x = _normalize_ref(x, scale, sub, div).permute(0, 3, 1, 2)  # [F, C, H, W]
        if f % T:
            x = torch.cat([x, x[-1:].expand(T - f % T, -1, -1, -1)])
        x = x.reshape(gt, T, C, gh // M, M, P, gw // M, M, P).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        pieces.append(x.reshape(gt * gh * gw, width))
    return torch.cat(pieces).to(dtype), grid_thw
