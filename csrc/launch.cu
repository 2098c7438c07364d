// Instantiates the kernels of preprocess.cuh and scatter.cuh for each dtype behind the plain functions of launch.h.
#include "launch.h"
#include "preprocess.cuh"
#include "scatter.cuh"

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

namespace {

template <typename T>
cudaError_t scatter_as(const void* embeds, int64_t stride_e, const void* feats, int64_t stride_f, int64_t n_features,
                       bool feats_fp32, const uint8_t* mask, int64_t rows, int64_t dim, void* out,
                       int64_t* group_offsets, int64_t* n_tokens, cudaStream_t stream) {
  if (feats_fp32) {
    return cuda::launch_scatter_image_features(static_cast<const T*>(embeds), stride_e,
                                               static_cast<const float*>(feats), stride_f, n_features, mask, rows,
                                               dim, static_cast<T*>(out), group_offsets, n_tokens, stream);
  }
  return cuda::launch_scatter_image_features(static_cast<const T*>(embeds), stride_e, static_cast<const T*>(feats),
                                             stride_f, n_features, mask, rows, dim, static_cast<T*>(out),
                                             group_offsets, n_tokens, stream);
}

}  // namespace

cudaError_t scatter_image_features_cuda(const void* embeds, int64_t stride_e, const void* feats, int64_t stride_f,
                                        int64_t n_features, bool feats_fp32, const uint8_t* mask, int64_t rows,
                                        int64_t dim, void* out, ScatterDtype dtype, int64_t* group_offsets,
                                        int64_t* n_tokens, cudaStream_t stream) {
  if (dim >= kScatterMaxDim) return cudaErrorInvalidValue;
  switch (dtype) {
    case ScatterDtype::kFloat32:  // float32 features are the same type: one instantiation
      return cuda::launch_scatter_image_features(static_cast<const float*>(embeds), stride_e,
                                                 static_cast<const float*>(feats), stride_f, n_features, mask, rows,
                                                 dim, static_cast<float*>(out), group_offsets, n_tokens, stream);
    case ScatterDtype::kFloat64:
      return scatter_as<double>(embeds, stride_e, feats, stride_f, n_features, feats_fp32, mask, rows, dim, out,
                                group_offsets, n_tokens, stream);
    case ScatterDtype::kBFloat16:
      return scatter_as<__nv_bfloat16>(embeds, stride_e, feats, stride_f, n_features, feats_fp32, mask, rows, dim,
                                       out, group_offsets, n_tokens, stream);
    case ScatterDtype::kFloat16:
      return scatter_as<__half>(embeds, stride_e, feats, stride_f, n_features, feats_fp32, mask, rows, dim, out,
                                group_offsets, n_tokens, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastvlm
