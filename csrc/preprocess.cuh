// GPU image preprocessing: uint8 HWC images -> rescale + per-channel normalisation -> NCHW tiles or Qwen2-VL's
// pre-patchified rows, in one pass over the bytes. No resizing. Torch-free: raw pointers, sizes, a cudaStream_t.
//
// Input: one flat uint8 buffer holding every image (HWC, row-major, C channels; a video is `frames` such images
// back to back) and an int64 metadata table in device memory (layout in common.cuh). Inconsistent metadata (an
// image past the end of the buffer, a size the layout cannot take, rows past the last image) is detected per
// element and written as NaN instead of reading out of bounds; the host wrappers validate before launching.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace fastvlm {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kMaxPatchThreads = 1024;
constexpr int64_t kMaxBlocks = int64_t{1} << 30;

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }

__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }

// out [n_images, C, out_h, out_w]. Grid: x over the pixels of one tile, y over images (strided past 65535).
// Each thread reads one pixel's C bytes and writes one element per channel plane (stores coalesced per plane).
// An image smaller than the tile sits at its top-left corner; the rest of the tile is `pad`.
template <typename OutT>
__global__ void __launch_bounds__(kThreads)
    normalize_tiles_kernel(const uint8_t* __restrict__ data, int64_t numel, const int64_t* __restrict__ meta,
                           int64_t n_images, OutT* __restrict__ out, int out_h, int out_w, NormParams p, float pad) {
  const int64_t plane = static_cast<int64_t>(out_h) * out_w;
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pix >= plane) return;
  const int64_t y = pix / out_w;
  const int64_t x = pix - y * out_w;
  const int C = p.channels;
  for (int64_t n = blockIdx.y; n < n_images; n += gridDim.y) {
    const int64_t off = meta[n * kTileMeta], h = meta[n * kTileMeta + 1], w = meta[n * kTileMeta + 2];
    OutT* o = out + n * C * plane + pix;
    const bool ok = image_in_bounds(off, h, w, 1, C, numel) && h <= out_h && w <= out_w;
    if (ok && y < h && x < w) {
      const uint8_t* px = data + off + (y * w + x) * C;
#pragma unroll
      for (int c = 0; c < kMaxChannels; ++c) {
        if (c < C) store(o + c * plane, normalize_u8(px[c], p, c));
      }
    } else {
      const float v = ok ? pad : nan_f32();
#pragma unroll
      for (int c = 0; c < kMaxChannels; ++c) {
        if (c < C) store(o + c * plane, v);
      }
    }
  }
}

// out [total_rows, C * T * patch * patch]. One block per row (grid-strided), one thread per pixel of the patch
// (blockDim = patch * patch rounded up to a warp): the row's image lookup and merge-window decode are done once per
// thread, then each thread reads its pixel's C bytes per frame (once for a still image, whose T frames are the same)
// and writes C * T elements; a warp writes consecutive elements of each (c, t) run, so the stores are coalesced.
template <typename OutT>
__global__ void __launch_bounds__(kMaxPatchThreads)
    qwen2vl_patchify_kernel(const uint8_t* __restrict__ data, int64_t numel, const int64_t* __restrict__ meta,
                            int64_t n_images, OutT* __restrict__ out, int64_t total_rows, NormParams p,
                            PatchGeom g) {
  const int pp = g.patch * g.patch;
  const int C = p.channels;
  const int T = g.temporal;
  const int64_t row_width = static_cast<int64_t>(C) * T * pp;
  for (int64_t row = blockIdx.x; row < total_rows; row += gridDim.x) {
    OutT* o = out + row * row_width;
    const int64_t* mi = meta + find_image(meta, n_images, row) * kPatchMeta;
    const int64_t off = mi[0], h = mi[1], w = mi[2], frames = mi[3], local = row - mi[4];
    const bool ok = image_in_bounds(off, h, w, frames, C, numel) && patch_shape_ok(h, w, g) && local >= 0 &&
                    local < patch_rows(h, w, frames, g);
    if (!ok) {  // uniform across the block
      for (int64_t k = threadIdx.x; k < row_width; k += blockDim.x) store(o + k, nan_f32());
      continue;
    }
    const PatchOrigin org = patch_origin(local, h, w, g);
    for (int pix = threadIdx.x; pix < pp; pix += blockDim.x) {
      const int ph = pix / g.patch;
      const int pw = pix - ph * g.patch;
      const uint8_t* base = data + off + ((org.y0 + ph) * w + org.x0 + pw) * C;
      float v[kMaxChannels];
      int64_t loaded = -1;
      for (int t = 0; t < T; ++t) {
        const int64_t f = frame_of(org.gt, t, frames, T);
        if (f != loaded) {
          const uint8_t* px = base + f * h * w * C;
#pragma unroll
          for (int c = 0; c < kMaxChannels; ++c) {
            if (c < C) v[c] = normalize_u8(px[c], p, c);
          }
          loaded = f;
        }
#pragma unroll
        for (int c = 0; c < kMaxChannels; ++c) {
          if (c < C) store(o + (c * T + t) * pp + pix, v[c]);
        }
      }
    }
  }
}

template <typename OutT>
cudaError_t launch_normalize_tiles(const uint8_t* data, int64_t numel, const int64_t* meta, int64_t n_images,
                                   OutT* out, int out_h, int out_w, const NormParams& p, float pad,
                                   cudaStream_t stream) {
  const int64_t plane = static_cast<int64_t>(out_h) * out_w;
  if (n_images == 0 || plane == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((plane + kThreads - 1) / kThreads),
                  static_cast<unsigned>(n_images < 65535 ? n_images : 65535));
  normalize_tiles_kernel<OutT><<<grid, kThreads, 0, stream>>>(data, numel, meta, n_images, out, out_h, out_w, p, pad);
  return cudaGetLastError();
}

template <typename OutT>
cudaError_t launch_qwen2vl_patchify(const uint8_t* data, int64_t numel, const int64_t* meta, int64_t n_images,
                                    OutT* out, int64_t total_rows, const NormParams& p, const PatchGeom& g,
                                    cudaStream_t stream) {
  if (n_images == 0 || total_rows == 0) return cudaSuccess;
  const int pp = g.patch * g.patch;
  int threads = (pp + 31) / 32 * 32;
  if (threads > kMaxPatchThreads) threads = kMaxPatchThreads;
  const int64_t blocks = total_rows < kMaxBlocks ? total_rows : kMaxBlocks;  // grid-stride beyond
  qwen2vl_patchify_kernel<OutT><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(data, numel, meta, n_images,
                                                                                       out, total_rows, p, g);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastvlm
