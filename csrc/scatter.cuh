// The image-token scatter on the GPU: the connector's output rows written into inputs_embeds at the positions of the
// image token (transformers' `inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))`), with the
// token count checked on the device. Torch-free: raw pointers, sizes, a cudaStream_t.
//
//   embeds [rows, dim] (row stride stride_e), mask [rows] bytes (nonzero = image token), features [n_features, dim]
//   (row stride stride_f) -> out [rows, dim] contiguous, *n_tokens = number of image tokens.
//
// Two kernels on one stream, no host synchronisation between or after them:
//   1. scatter_scan_kernel (one block of 1024 threads): each thread counts the image tokens of one 32-row group,
//      a block-wide exclusive scan (warp shuffles) gives group_offsets[g]; the total is written to *n_tokens.
//      One block reads 32768 mask bytes per step: ~1 us per 32k rows, against the row copy's R * dim * bytes.
//   2. scatter_rows_kernel: block (x, y) takes the 32-row group x (grid-strided) and the column slice y; each warp
//      ballots the group's 32 mask bytes (the feature row of an image-token row is group_offsets[g] plus the
//      popcount of the bits below it, common.cuh) and copies 16-byte packs (one element per thread when a row or
//      pointer is not aligned for them). It reads *n_tokens: when it differs from n_features, every image-token
//      row is written as NaN and no feature row is read (the device-side count check; the host reads *n_tokens
//      when, and if, it wants to raise).
// Features of another dtype than the embeddings are cast in the kernel, rounding to nearest even like Tensor.to
// (float32 features into bfloat16/float16/float64 embeddings; the binding casts any other pair beforehand).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace fastvlm {
namespace cuda {
namespace scatter_impl {

constexpr int kScanThreads = 1024;
constexpr int kScanWarps = kScanThreads / 32;
constexpr int kCopyThreads = 256;
constexpr int kCopyItemsPerBlock = kCopyThreads * 8;  // packs per block: the column slice width follows from it
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxGridY = 65535;

static_assert(kScanWarps <= 32, "the second level of the scan is one warp");

// features dtype -> embeddings dtype, round to nearest even (Tensor.to)
template <typename OutT, typename InT>
struct Cast;
template <typename T>
struct Cast<T, T> {
  __device__ __forceinline__ static T apply(T v) { return v; }
};
template <>
struct Cast<__nv_bfloat16, float> {
  __device__ __forceinline__ static __nv_bfloat16 apply(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Cast<__half, float> {
  __device__ __forceinline__ static __half apply(float v) { return __float2half_rn(v); }
};
template <>
struct Cast<double, float> {
  __device__ __forceinline__ static double apply(float v) { return static_cast<double>(v); }
};

template <typename OutT>
__device__ __forceinline__ OutT quiet_nan() {
  return Cast<OutT, float>::apply(__int_as_float(0x7fc00000));
}

// N consecutive elements moved as one (16-byte) access; N = 1 is the unaligned fallback. Stores go through an
// integer vector of the same size (RawOf): a struct of __half/__nv_bfloat16 would be stored element by element.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int Bytes>
struct RawOf;
template <>
struct RawOf<16> {
  using type = uint4;
};
template <>
struct RawOf<8> {
  using type = uint2;
};
template <>
struct RawOf<4> {
  using type = uint32_t;
};
template <>
struct RawOf<2> {
  using type = uint16_t;
};

template <typename P>
__device__ __forceinline__ void store_pack(void* dst, const P& v) {
  using R = typename RawOf<sizeof(P)>::type;
  *reinterpret_cast<R*>(dst) = *reinterpret_cast<const R*>(&v);
}

// Image tokens among the rows of group g (nonzero bytes; bool masks hold 0/1 but any nonzero byte counts).
__device__ __forceinline__ int group_count(const uint8_t* __restrict__ mask, int64_t rows, int64_t g, bool aligned16) {
  const int64_t r0 = g * kScatterGroup;
  if (aligned16 && r0 + kScatterGroup <= rows) {
    const uint4* p = reinterpret_cast<const uint4*>(mask + r0);
    const uint4 a = p[0], b = p[1];
    // __vcmpne4: 0xff in each byte that differs from 0, so popc / 8 counts the nonzero bytes
    const int bits = __popc(__vcmpne4(a.x, 0u)) + __popc(__vcmpne4(a.y, 0u)) + __popc(__vcmpne4(a.z, 0u)) +
                     __popc(__vcmpne4(a.w, 0u)) + __popc(__vcmpne4(b.x, 0u)) + __popc(__vcmpne4(b.y, 0u)) +
                     __popc(__vcmpne4(b.z, 0u)) + __popc(__vcmpne4(b.w, 0u));
    return bits >> 3;
  }
  const int64_t end = r0 + kScatterGroup < rows ? r0 + kScatterGroup : rows;
  int c = 0;
  for (int64_t r = r0; r < end; ++r) c += mask[r] != 0;
  return c;
}

// One block. group_offsets[g] = image tokens in rows [0, 32 g); *n_tokens = image tokens in all rows.
__global__ void __launch_bounds__(kScanThreads)
    scatter_scan_kernel(const uint8_t* __restrict__ mask, int64_t rows, int64_t* __restrict__ group_offsets,
                        int64_t* __restrict__ n_tokens) {
  __shared__ int warp_sums[kScanWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const bool aligned16 = (reinterpret_cast<uintptr_t>(mask) & 15u) == 0;
  const int64_t groups = scatter_groups(rows);
  int64_t carry = 0;
  for (int64_t base = 0; base < groups; base += kScanThreads) {
    const int64_t g = base + threadIdx.x;
    const int c = g < groups ? group_count(mask, rows, g, aligned16) : 0;
    int v = c;  // inclusive scan within the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) v += n;
    }
    if (lane == 31) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {  // inclusive scan of the warps' totals
      int s = lane < kScanWarps ? warp_sums[lane] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += n;
      }
      if (lane < kScanWarps) warp_sums[lane] = s;
    }
    __syncthreads();
    if (g < groups) group_offsets[g] = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + (v - c);
    carry += warp_sums[kScanWarps - 1];
    __syncthreads();  // warp_sums is rewritten by the next step
  }
  if (threadIdx.x == 0) *n_tokens = carry;
}

// out [rows, packs * VEC]. Grid: x over 32-row groups (strided), y over column slices of `slice` packs.
template <typename OutT, typename InT, int VEC>
__global__ void __launch_bounds__(kCopyThreads)
    scatter_rows_kernel(const OutT* __restrict__ embeds, int64_t stride_e, const InT* __restrict__ feats,
                        int64_t stride_f, int64_t n_features, const uint8_t* __restrict__ mask,
                        const int64_t* __restrict__ group_offsets, const int64_t* __restrict__ n_tokens,
                        OutT* __restrict__ out, int64_t rows, int packs, int slice) {
  using OutPack = Pack<OutT, VEC>;
  using InPack = Pack<InT, VEC>;
  const bool counts_ok = *n_tokens == n_features;  // then every feature index below is < n_features
  const int lane = threadIdx.x & 31;
  const int p0 = static_cast<int>(blockIdx.y) * slice;
  const int width = (packs - p0 < slice ? packs - p0 : slice);
  if (width <= 0) return;  // uniform across the block
  const int64_t dim = static_cast<int64_t>(packs) * VEC;
  const int64_t groups = scatter_groups(rows);
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t row0 = g * kScatterGroup;
    const int64_t r = row0 + lane;
    const uint32_t word = __ballot_sync(0xffffffffu, r < rows && mask[r] != 0);
    const int nrows = static_cast<int>(rows - row0 < kScatterGroup ? rows - row0 : kScatterGroup);
    const int64_t first = group_offsets[g];
    const int work = nrows * width;
    for (int i = threadIdx.x; i < work; i += kCopyThreads) {
      const int l = i / width;
      const int64_t col = static_cast<int64_t>(p0 + (i - l * width)) * VEC;
      const int64_t row = row0 + l;
      OutT* dst = out + row * dim + col;
      if (!scatter_bit(word, l)) {  // text token: a raw copy
        using R = typename RawOf<sizeof(OutPack)>::type;
        *reinterpret_cast<R*>(dst) = *reinterpret_cast<const R*>(embeds + row * stride_e + col);
        continue;
      }
      OutPack v;
      if (counts_ok) {
        const int64_t f = first + scatter_rank(word, l);
        const InPack x = *reinterpret_cast<const InPack*>(feats + f * stride_f + col);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v.v[k] = Cast<OutT, InT>::apply(x.v[k]);
      } else {
        const OutT nan = quiet_nan<OutT>();
#pragma unroll
        for (int k = 0; k < VEC; ++k) v.v[k] = nan;
      }
      store_pack(dst, v);
    }
  }
}

inline bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename OutT, typename InT, int VEC>
cudaError_t launch_rows(const OutT* embeds, int64_t stride_e, const InT* feats, int64_t stride_f, int64_t n_features,
                        const uint8_t* mask, const int64_t* group_offsets, const int64_t* n_tokens, OutT* out,
                        int64_t rows, int64_t dim, cudaStream_t stream) {
  const int64_t packs = dim / VEC;
  const int64_t per_slice = kCopyItemsPerBlock / kScatterGroup;  // packs of one row per block when 32 rows
  int64_t slices = (packs + per_slice - 1) / per_slice;
  if (slices > kMaxGridY) slices = kMaxGridY;
  const int64_t slice = (packs + slices - 1) / slices;
  slices = (packs + slice - 1) / slice;
  const int64_t groups = scatter_groups(rows);
  const dim3 grid(static_cast<unsigned>(groups < kMaxGridX ? groups : kMaxGridX), static_cast<unsigned>(slices));
  scatter_rows_kernel<OutT, InT, VEC><<<grid, kCopyThreads, 0, stream>>>(
      embeds, stride_e, feats, stride_f, n_features, mask, group_offsets, n_tokens, out, rows,
      static_cast<int>(packs), static_cast<int>(slice));
  return cudaGetLastError();
}

}  // namespace scatter_impl

// group_offsets: device scratch of scatter_groups(rows) int64; n_tokens: one device int64 (written, never read on
// the host here). Requires dim < kScatterMaxDim (common.cuh; checked by the caller).
template <typename OutT, typename InT>
cudaError_t launch_scatter_image_features(const OutT* embeds, int64_t stride_e, const InT* feats, int64_t stride_f,
                                          int64_t n_features, const uint8_t* mask, int64_t rows, int64_t dim,
                                          OutT* out, int64_t* group_offsets, int64_t* n_tokens,
                                          cudaStream_t stream) {
  using namespace scatter_impl;
  if (rows == 0) return cudaMemsetAsync(n_tokens, 0, sizeof(int64_t), stream);
  scatter_scan_kernel<<<1, kScanThreads, 0, stream>>>(mask, rows, group_offsets, n_tokens);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || dim == 0) return err;
  constexpr int kVec = static_cast<int>(16 / sizeof(OutT));
  const bool vec = dim % kVec == 0 && stride_e % kVec == 0 && stride_f % kVec == 0 &&
                   aligned_to(embeds, kVec * sizeof(OutT)) && aligned_to(out, kVec * sizeof(OutT)) &&
                   aligned_to(feats, kVec * sizeof(InT));
  if (vec) {
    return launch_rows<OutT, InT, kVec>(embeds, stride_e, feats, stride_f, n_features, mask, group_offsets, n_tokens,
                                        out, rows, dim, stream);
  }
  return launch_rows<OutT, InT, 1>(embeds, stride_e, feats, stride_f, n_features, mask, group_offsets, n_tokens, out,
                                   rows, dim, stream);
}

}  // namespace cuda
}  // namespace fastvlm
