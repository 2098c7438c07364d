// Host entry points of the CUDA kernels, compiled by nvcc in launch.cu and called from the torch binding (ops.cpp,
// compiled by the host compiler). Torch-free, so the nvcc translation unit stays small and fast to build.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.cuh"

namespace fastvlm {

enum class OutDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

cudaError_t normalize_tiles_cuda(const uint8_t* data, int64_t numel, const int64_t* meta, int64_t n_images, void* out,
                                 OutDtype dtype, int out_h, int out_w, const NormParams& p, float pad,
                                 cudaStream_t stream);

cudaError_t qwen2vl_patchify_cuda(const uint8_t* data, int64_t numel, const int64_t* meta, int64_t n_images,
                                  void* out, OutDtype dtype, int64_t total_rows, const NormParams& p,
                                  const PatchGeom& g, cudaStream_t stream);

// Image-token scatter (scatter.cuh). embeds, out and (unless feats_fp32) feats are of `dtype`; feats_fp32: the
// features are float32 and cast in the kernel. group_offsets: device scratch of scatter_groups(rows) int64;
// n_tokens: one device int64, written by the kernels (the token count). No host synchronisation.
enum class ScatterDtype : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

cudaError_t scatter_image_features_cuda(const void* embeds, int64_t stride_e, const void* feats, int64_t stride_f,
                                        int64_t n_features, bool feats_fp32, const uint8_t* mask, int64_t rows,
                                        int64_t dim, void* out, ScatterDtype dtype, int64_t* group_offsets,
                                        int64_t* n_tokens, cudaStream_t stream);

}  // namespace fastvlm
