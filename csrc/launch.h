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

}  // namespace fastvlm
