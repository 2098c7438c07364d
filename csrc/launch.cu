// Instantiates the kernels of preprocess.cuh for each output dtype behind the plain functions of launch.h.
#include "launch.h"
#include "preprocess.cuh"

namespace fastvlm {

cudaError_t normalize_tiles_cuda(const uint8_t* data, int64_t numel, const int64_t* meta, int64_t n_images, void* out,
                                 OutDtype dtype, int out_h, int out_w, const NormParams& p, float pad,
                                 cudaStream_t stream) {
  switch (dtype) {
    case OutDtype::kFloat32:
      return cuda::launch_normalize_tiles(data, numel, meta, n_images, static_cast<float*>(out), out_h, out_w, p, pad,
                                          stream);
    case OutDtype::kBFloat16:
      return cuda::launch_normalize_tiles(data, numel, meta, n_images, static_cast<__nv_bfloat16*>(out), out_h,
                                          out_w, p, pad, stream);
    case OutDtype::kFloat16:
      return cuda::launch_normalize_tiles(data, numel, meta, n_images, static_cast<__half*>(out), out_h, out_w, p,
                                          pad, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t qwen2vl_patchify_cuda(const uint8_t* data, int64_t numel, const int64_t* meta, int64_t n_images,
                                  void* out, OutDtype dtype, int64_t total_rows, const NormParams& p,
                                  const PatchGeom& g, cudaStream_t stream) {
  switch (dtype) {
    case OutDtype::kFloat32:
      return cuda::launch_qwen2vl_patchify(data, numel, meta, n_images, static_cast<float*>(out), total_rows, p, g,
                                           stream);
    case OutDtype::kBFloat16:
      return cuda::launch_qwen2vl_patchify(data, numel, meta, n_images, static_cast<__nv_bfloat16*>(out),
                                           total_rows, p, g, stream);
    case OutDtype::kFloat16:
      return cuda::launch_qwen2vl_patchify(data, numel, meta, n_images, static_cast<__half*>(out), total_rows, p, g,
                                           stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastvlm
