// Shared by the CUDA kernels (preprocess.cuh, scatter.cuh) and the CPU loops (preprocess_cpu.h, scatter_cpu.h):
// parameters, per-image metadata layout, the index math of the two preprocessing layouts and of the image-token
// scatter. Torch-free; compiles with nvcc and with a plain C++ compiler.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FVLM_HD __host__ __device__ __forceinline__
#else
#define FVLM_HD inline
#endif

namespace fastvlm {

constexpr int kMaxChannels = 4;

// out = (u8 * scale - sub[c]) / div[c], each step rounded to fp32 (no contraction). Hugging Face's torchvision image
// processors fold rescale into normalize: sub = mean / rescale_factor, div = std / rescale_factor, scale = 1, which
// this reproduces bit for bit; rescale only is scale = rescale_factor, sub = 0, div = 1.
struct NormParams {
  float scale;
  float sub[kMaxChannels];
  float div[kMaxChannels];
  int channels;
};

// Per-image metadata, one int64 row per image, in the input buffer's memory (device memory for the CUDA kernels).
// offset: index of the image's first byte in the flat uint8 buffer; each frame is H*W*C bytes, HWC, row-major.
constexpr int kTileMeta = 3;   // {offset, height, width}
constexpr int kPatchMeta = 5;  // {offset, height, width, frames, first_row}

FVLM_HD float normalize_u8(uint8_t v, const NormParams& p, int c) {
#if defined(__CUDA_ARCH__)
  // explicit round-to-nearest intrinsics: immune to --use_fast_math and FMA contraction
  float t = __fmul_rn(static_cast<float>(v), p.scale);
  t = __fsub_rn(t, p.sub[c]);
  return __fdiv_rn(t, p.div[c]);
#else
  float t = static_cast<float>(v) * p.scale;
  t = t - p.sub[c];
  return t / p.div[c];
#endif
}

// True when an image's metadata is consistent with the buffer (checked on the device too: a bad row yields NaN
// outputs instead of an out-of-bounds read).
FVLM_HD bool image_in_bounds(int64_t offset, int64_t h, int64_t w, int64_t frames, int channels, int64_t numel) {
  return offset >= 0 && h > 0 && w > 0 && frames > 0 && offset + frames * h * w * channels <= numel;
}

// Qwen2-VL patch layout. For one image/video of `frames` frames of H x W (multiples of patch * merge):
//   grid_t = ceil(frames / T), grid_h = H / patch, grid_w = W / patch, rows = grid_t * grid_h * grid_w
//   row = ((gt * (grid_h/merge) + bh) * (grid_w/merge) + bw) * merge * merge + mh * merge + mw
//   col = ((c * T + t) * patch + ph) * patch + pw
//   value = normalize(frame min(gt * T + t, frames - 1), channel c, y = (bh*merge + mh)*patch + ph,
//                     x = (bw*merge + mw)*patch + pw)
// The clamp on the frame index is the temporal duplication of a still image (frames = 1) and the repetition of the
// last frame that pads a video to a multiple of T; it equals transformers' Qwen2VLImageProcessor.patchify and
// Qwen2VLVideoProcessor.patchify.
struct PatchGeom {
  int patch;
  int merge;
  int temporal;
};

struct PatchOrigin {
  int64_t gt;  // temporal patch index
  int64_t y0;  // top-left pixel of the patch
  int64_t x0;
};

FVLM_HD int64_t patch_rows(int64_t h, int64_t w, int64_t frames, const PatchGeom& g) {
  return ((frames + g.temporal - 1) / g.temporal) * (h / g.patch) * (w / g.patch);
}

FVLM_HD bool patch_shape_ok(int64_t h, int64_t w, const PatchGeom& g) {
  const int64_t f = static_cast<int64_t>(g.patch) * g.merge;
  return h % f == 0 && w % f == 0;
}

FVLM_HD PatchOrigin patch_origin(int64_t local_row, int64_t h, int64_t w, const PatchGeom& g) {
  const int64_t gh = h / g.patch, gw = w / g.patch;
  const int64_t m = g.merge;
  PatchOrigin o;
  o.gt = local_row / (gh * gw);
  int64_t r = local_row - o.gt * gh * gw;
  const int64_t mw = r % m;
  r /= m;
  const int64_t mh = r % m;
  r /= m;
  const int64_t bw = r % (gw / m);
  const int64_t bh = r / (gw / m);
  o.y0 = (bh * m + mh) * g.patch;
  o.x0 = (bw * m + mw) * g.patch;
  return o;
}

FVLM_HD int64_t frame_of(int64_t gt, int t, int64_t frames, int temporal) {
  const int64_t f = gt * temporal + t;
  return f < frames ? f : frames - 1;
}

// Index of the image whose rows contain `row`: the last i with first_row[i] <= row (first_row ascending).
FVLM_HD int64_t find_image(const int64_t* meta, int64_t n_images, int64_t row) {
  int64_t lo = 0, hi = n_images - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (meta[mid * kPatchMeta + 4] <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// ---------------------------------------------------------------- image-token scatter
// Rows are taken in groups of 32, one bit per row in a 32-bit word (a warp ballot on the GPU). The feature row of an
// image-token row r = 32 g + l is
//   group_offset[g] + popcount(word_g & ((1 << l) - 1))
// where group_offset[g] is the number of image tokens in rows [0, 32 g) (an exclusive scan over the groups' counts).
// The scan's total is the device-side token count; the rows are copied only when it equals the number of feature
// rows, else every image-token row is written as NaN (never an out-of-bounds read).
constexpr int kScatterGroup = 32;
constexpr int64_t kScatterMaxDim = int64_t{1} << 24;  // rows narrower than this (32-bit per-block work index)

FVLM_HD int64_t scatter_groups(int64_t rows) { return (rows + kScatterGroup - 1) / kScatterGroup; }

FVLM_HD int popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// Number of image-token rows before lane `lane` of a group whose mask bits are `word`.
FVLM_HD int scatter_rank(uint32_t word, int lane) { return popcount32(word & ((uint32_t{1} << lane) - 1u)); }

FVLM_HD bool scatter_bit(uint32_t word, int lane) { return (word >> lane) & 1u; }

}  // namespace fastvlm
