// CPU implementation of the image-token scatter: the same 32-row groups, exclusive scan and per-row rank as the CUDA
// kernels (common.cuh), as plain loops, with the same result on a token-count mismatch (image-token rows NaN, the
// count returned). Torch-free; `OutT` is float, double, c10::BFloat16 or c10::Half, `InT` is `OutT` or float
// (static_cast rounds to nearest even, like Tensor.to), and `pfor(begin, end, fn)` runs fn(chunk_begin, chunk_end)
// over [begin, end), e.g. at::parallel_for.
#pragma once

#include <cstdint>
#include <limits>

#include "common.cuh"

namespace fastvlm {
namespace cpu {

// The mask bits of group g (bit l = row 32 g + l is an image token), as the GPU's warp ballot builds them.
inline uint32_t scatter_word(const uint8_t* mask, int64_t rows, int64_t g) {
  const int64_t r0 = g * kScatterGroup;
  const int64_t n = rows - r0 < kScatterGroup ? rows - r0 : kScatterGroup;
  uint32_t word = 0;
  for (int64_t l = 0; l < n; ++l) word |= static_cast<uint32_t>(mask[r0 + l] != 0) << l;
  return word;
}

// group_offsets[g] = image tokens in rows [0, 32 g) (scatter_groups(rows) entries); returns the token count.
inline int64_t scatter_scan(const uint8_t* mask, int64_t rows, int64_t* group_offsets) {
  int64_t total = 0;
  for (int64_t g = 0; g < scatter_groups(rows); ++g) {
    group_offsets[g] = total;
    total += popcount32(scatter_word(mask, rows, g));
  }
  return total;
}

// out [rows, dim] contiguous. counts_ok: the scan's total equals the number of feature rows (else the image-token
// rows are NaN and no feature row is read).
template <typename OutT, typename InT, typename ParallelFor>
void scatter_rows(const OutT* embeds, int64_t stride_e, const InT* feats, int64_t stride_f, bool counts_ok,
                  const uint8_t* mask, const int64_t* group_offsets, int64_t rows, int64_t dim, OutT* out,
                  ParallelFor&& pfor) {
  const OutT nan = static_cast<OutT>(std::numeric_limits<float>::quiet_NaN());
  pfor(int64_t{0}, scatter_groups(rows), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const uint32_t word = scatter_word(mask, rows, g);
      const int64_t row0 = g * kScatterGroup;
      const int n = static_cast<int>(rows - row0 < kScatterGroup ? rows - row0 : kScatterGroup);
      for (int l = 0; l < n; ++l) {
        OutT* o = out + (row0 + l) * dim;
        if (!scatter_bit(word, l)) {
          const OutT* e = embeds + (row0 + l) * stride_e;
          for (int64_t d = 0; d < dim; ++d) o[d] = e[d];
        } else if (counts_ok) {
          const InT* f = feats + (group_offsets[g] + scatter_rank(word, l)) * stride_f;
          for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<OutT>(f[d]);
        } else {
          for (int64_t d = 0; d < dim; ++d) o[d] = nan;
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace fastvlm
