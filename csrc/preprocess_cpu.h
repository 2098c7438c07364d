// CPU implementations of the preprocessing ops: the same index math as the CUDA kernels (common.cuh), as plain
// loops. Torch-free; `OutT` is any type constructible from float with round-to-nearest-even (float, c10::BFloat16,
// c10::Half) and `pfor(begin, end, fn)` runs fn(chunk_begin, chunk_end) over [begin, end), e.g. at::parallel_for.
// The caller validates the metadata first (ops.cpp raises on bad input), so these loops do no bounds checks.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace fastvlm {
namespace cpu {

template <typename OutT, typename ParallelFor>
void normalize_tiles(const uint8_t* data, const int64_t* meta, int64_t n_images, OutT* out, int64_t out_h,
                     int64_t out_w, const NormParams& p, float pad, ParallelFor&& pfor) {
  const int C = p.channels;
  const int64_t plane = out_h * out_w;
  const OutT pad_v(pad);
  pfor(int64_t{0}, n_images * out_h, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / out_h, y = r % out_h;
      const int64_t off = meta[n * kTileMeta], h = meta[n * kTileMeta + 1], w = meta[n * kTileMeta + 2];
      OutT* o = out + n * C * plane + y * out_w;
      const int64_t valid = y < h ? w : 0;
      for (int c = 0; c < C; ++c) {
        OutT* oc = o + c * plane;
        const uint8_t* px = data + off + y * w * C + c;
        for (int64_t x = 0; x < valid; ++x) oc[x] = OutT(normalize_u8(px[x * C], p, c));
        for (int64_t x = valid; x < out_w; ++x) oc[x] = pad_v;
      }
    }
  });
}

template <typename OutT, typename ParallelFor>
void qwen2vl_patchify(const uint8_t* data, const int64_t* meta, int64_t n_images, OutT* out, int64_t total_rows,
                      const NormParams& p, const PatchGeom& g, ParallelFor&& pfor) {
  const int C = p.channels, T = g.temporal, P = g.patch;
  const int64_t pp = static_cast<int64_t>(P) * P;
  const int64_t row_width = C * T * pp;
  pfor(int64_t{0}, total_rows, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t* mi = meta + find_image(meta, n_images, row) * kPatchMeta;
      const int64_t off = mi[0], h = mi[1], w = mi[2], frames = mi[3];
      const PatchOrigin org = patch_origin(row - mi[4], h, w, g);
      OutT* o = out + row * row_width;
      for (int c = 0; c < C; ++c) {
        for (int t = 0; t < T; ++t) {
          const int64_t f = frame_of(org.gt, t, frames, T);
          OutT* oct = o + (c * T + t) * pp;
          for (int ph = 0; ph < P; ++ph) {
            const uint8_t* px = data + off + ((f * h + org.y0 + ph) * w + org.x0) * C + c;
            for (int pw = 0; pw < P; ++pw) oct[ph * P + pw] = OutT(normalize_u8(px[pw * C], p, c));
          }
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace fastvlm
