// The torch binding: schemas of the fastvlm_ext ops, their CPU, Meta and CUDA implementations, and the Python
// module init. The only translation unit that includes torch, compiled by the host compiler (the CUDA kernels are
// compiled by nvcc in launch.cu, behind torch-free functions). The `fastvlm_ext` namespace is separate from the
// `fastvlm` namespace of the Python custom ops: a TORCH_LIBRARY namespace can be defined only once per process.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "common.cuh"
#include "launch.h"
#include "preprocess_cpu.h"
#include "scatter_cpu.h"

// Bumped when a schema or the metadata layout changes; fastvlm/_cext.py refuses a prebuilt module of another version.
// 2: scatter_image_features.
#define FASTVLM_EXT_ABI_VERSION 2

namespace fastvlm {
namespace {

// ---------------------------------------------------------------- checks shared by every implementation

NormParams norm_params(at::ArrayRef<double> sub, at::ArrayRef<double> div, double scale) {
  TORCH_CHECK(sub.size() == div.size(), "fastvlm_ext: sub and div must have one value per channel, got ", sub.size(),
              " and ", div.size());
  TORCH_CHECK(!sub.empty() && sub.size() <= static_cast<size_t>(kMaxChannels), "fastvlm_ext: 1 to ", kMaxChannels,
              " channels supported, got ", sub.size());
  NormParams p{};
  p.scale = static_cast<float>(scale);
  p.channels = static_cast<int>(sub.size());
  for (size_t c = 0; c < sub.size(); ++c) {
    p.sub[c] = static_cast<float>(sub[c]);
    p.div[c] = static_cast<float>(div[c]);
  }
  return p;
}

void check_inputs(const char* op, const at::Tensor& data, const at::Tensor& meta, int64_t meta_fields,
                  at::ScalarType out_dtype) {
  TORCH_CHECK(data.scalar_type() == at::kByte && data.dim() == 1 && data.is_contiguous(), op,
              ": data must be a contiguous 1-D uint8 buffer, got ", data.scalar_type(), " of shape ", data.sizes());
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.dim() == 2 && meta.size(1) == meta_fields &&
                  meta.is_contiguous(),
              op, ": meta must be a contiguous int64 tensor [n_images, ", meta_fields, "], got ", meta.scalar_type(),
              " of shape ", meta.sizes());
  TORCH_CHECK(meta.device() == data.device(), op, ": meta must be on the device of data (", data.device(), "), got ",
              meta.device());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf, op,
              ": out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
}

PatchGeom patch_geom(int64_t patch, int64_t merge, int64_t temporal) {
  TORCH_CHECK(patch > 0 && merge > 0 && temporal > 0 && patch <= 64 && merge <= 16 && temporal <= 16,
              "fastvlm_ext::qwen2vl_patchify: bad patch_size/merge_size/temporal_patch_size ", patch, "/", merge, "/",
              temporal);
  return PatchGeom{static_cast<int>(patch), static_cast<int>(merge), static_cast<int>(temporal)};
}

OutDtype out_kind(at::ScalarType t) {
  return t == at::kFloat ? OutDtype::kFloat32 : (t == at::kBFloat16 ? OutDtype::kBFloat16 : OutDtype::kFloat16);
}

template <typename Fn>
void dispatch_out(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat:
      fn(float{});
      break;
    case at::kBFloat16:
      fn(c10::BFloat16{});
      break;
    default:
      fn(c10::Half{});
  }
}

auto parallel_for(int64_t grain) {
  return [grain](int64_t begin, int64_t end, auto&& fn) { at::parallel_for(begin, end, grain, fn); };
}

// ---------------------------------------------------------------- normalize_tiles

constexpr const char* kTiles = "fastvlm_ext::normalize_tiles";
constexpr const char* kPatchify = "fastvlm_ext::qwen2vl_patchify";

at::Tensor tiles_empty(const at::Tensor& data, const at::Tensor& meta, const NormParams& p, int64_t out_h,
                       int64_t out_w, at::ScalarType out_dtype) {
  TORCH_CHECK(out_h >= 0 && out_w >= 0, kTiles, ": bad tile size ", out_h, "x", out_w);
  return at::empty({meta.size(0), p.channels, out_h, out_w}, data.options().dtype(out_dtype));
}

at::Tensor tiles_meta(const at::Tensor& data, const at::Tensor& meta, at::ArrayRef<double> sub,
                                at::ArrayRef<double> div, double scale, int64_t out_h, int64_t out_w, double pad,
                                at::ScalarType out_dtype) {
  check_inputs(kTiles, data, meta, kTileMeta, out_dtype);
  return tiles_empty(data, meta, norm_params(sub, div, scale), out_h, out_w, out_dtype);
}

at::Tensor tiles_cpu(const at::Tensor& data, const at::Tensor& meta, at::ArrayRef<double> sub,
                               at::ArrayRef<double> div, double scale, int64_t out_h, int64_t out_w, double pad,
                               at::ScalarType out_dtype) {
  check_inputs(kTiles, data, meta, kTileMeta, out_dtype);
  const NormParams p = norm_params(sub, div, scale);
  at::Tensor out = tiles_empty(data, meta, p, out_h, out_w, out_dtype);
  const int64_t* m = meta.data_ptr<int64_t>();
  for (int64_t i = 0; i < meta.size(0); ++i) {
    const int64_t off = m[i * kTileMeta], h = m[i * kTileMeta + 1], w = m[i * kTileMeta + 2];
    TORCH_CHECK(image_in_bounds(off, h, w, 1, p.channels, data.numel()), kTiles, ": image ", i, " (offset ", off,
                ", ", h, "x", w, "x", p.channels, ") does not fit in the ", data.numel(), "-byte buffer");
    TORCH_CHECK(h <= out_h && w <= out_w, kTiles, ": image ", i, " is ", h, "x", w, ", larger than the ", out_h, "x",
                out_w, " tile (no resizing or cropping here)");
  }
  const uint8_t* src = data.data_ptr<uint8_t>();
  dispatch_out(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::normalize_tiles(src, m, meta.size(0), out.data_ptr<T>(), out_h, out_w, p, static_cast<float>(pad),
                         parallel_for(16));
  });
  return out;
}

at::Tensor tiles_cuda(const at::Tensor& data, const at::Tensor& meta, at::ArrayRef<double> sub,
                                at::ArrayRef<double> div, double scale, int64_t out_h, int64_t out_w, double pad,
                                at::ScalarType out_dtype) {
  check_inputs(kTiles, data, meta, kTileMeta, out_dtype);
  TORCH_CHECK(out_h < (int64_t{1} << 31) && out_w < (int64_t{1} << 31), kTiles, ": tile too large");
  const NormParams p = norm_params(sub, div, scale);
  const c10::cuda::CUDAGuard guard(data.device());
  at::Tensor out = tiles_empty(data, meta, p, out_h, out_w, out_dtype);
  const cudaError_t err = fastvlm::normalize_tiles_cuda(
      data.data_ptr<uint8_t>(), data.numel(), meta.data_ptr<int64_t>(), meta.size(0), out.data_ptr(),
      out_kind(out_dtype), static_cast<int>(out_h), static_cast<int>(out_w), p, static_cast<float>(pad),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, kTiles, ": kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

// ---------------------------------------------------------------- qwen2vl_patchify

at::Tensor patchify_meta(const at::Tensor& data, const at::Tensor& meta, at::ArrayRef<double> sub,
                         at::ArrayRef<double> div, double scale, int64_t patch, int64_t merge, int64_t temporal,
                         c10::SymInt total_rows, at::ScalarType out_dtype) {
  check_inputs(kPatchify, data, meta, kPatchMeta, out_dtype);
  const NormParams p = norm_params(sub, div, scale);
  patch_geom(patch, merge, temporal);
  const c10::SymInt width = p.channels * temporal * patch * patch;
  return at::empty_symint({std::move(total_rows), width}, data.options().dtype(out_dtype));
}

at::Tensor patchify_cpu(const at::Tensor& data, const at::Tensor& meta, at::ArrayRef<double> sub,
                        at::ArrayRef<double> div, double scale, int64_t patch, int64_t merge, int64_t temporal,
                        int64_t total_rows, at::ScalarType out_dtype) {
  check_inputs(kPatchify, data, meta, kPatchMeta, out_dtype);
  const NormParams p = norm_params(sub, div, scale);
  const PatchGeom g = patch_geom(patch, merge, temporal);
  const int64_t* m = meta.data_ptr<int64_t>();
  int64_t rows = 0;
  for (int64_t i = 0; i < meta.size(0); ++i) {
    const int64_t* mi = m + i * kPatchMeta;
    TORCH_CHECK(image_in_bounds(mi[0], mi[1], mi[2], mi[3], p.channels, data.numel()), kPatchify, ": image ", i,
                " (offset ", mi[0], ", ", mi[3], " frame(s) of ", mi[1], "x", mi[2], "x", p.channels,
                ") does not fit in the ", data.numel(), "-byte buffer");
    TORCH_CHECK(patch_shape_ok(mi[1], mi[2], g), kPatchify, ": image ", i, " is ", mi[1], "x", mi[2],
                "; height and width must be multiples of patch_size * merge_size = ", patch * merge);
    TORCH_CHECK(mi[4] == rows, kPatchify, ": image ", i, " starts at row ", mi[4], ", expected ", rows);
    rows += patch_rows(mi[1], mi[2], mi[3], g);
  }
  TORCH_CHECK(rows == total_rows, kPatchify, ": the images make ", rows, " rows, total_rows is ", total_rows);
  at::Tensor out = at::empty({total_rows, p.channels * temporal * patch * patch}, data.options().dtype(out_dtype));
  const uint8_t* src = data.data_ptr<uint8_t>();
  dispatch_out(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::qwen2vl_patchify(src, m, meta.size(0), out.data_ptr<T>(), total_rows, p, g, parallel_for(8));
  });
  return out;
}

at::Tensor patchify_cuda(const at::Tensor& data, const at::Tensor& meta, at::ArrayRef<double> sub,
                         at::ArrayRef<double> div, double scale, int64_t patch, int64_t merge, int64_t temporal,
                         int64_t total_rows, at::ScalarType out_dtype) {
  // The metadata stays on the device (validating it here would synchronise); the kernel writes NaN for any row
  // whose metadata is inconsistent. fastvlm.ops.preprocess validates it on the host before uploading it.
  check_inputs(kPatchify, data, meta, kPatchMeta, out_dtype);
  TORCH_CHECK(total_rows >= 0, kPatchify, ": total_rows must be >= 0, got ", total_rows);
  TORCH_CHECK(meta.size(0) > 0 || total_rows == 0, kPatchify, ": ", total_rows, " rows requested from no images");
  const NormParams p = norm_params(sub, div, scale);
  const PatchGeom g = patch_geom(patch, merge, temporal);
  const c10::cuda::CUDAGuard guard(data.device());
  at::Tensor out = at::empty({total_rows, p.channels * temporal * patch * patch}, data.options().dtype(out_dtype));
  const cudaError_t err = fastvlm::qwen2vl_patchify_cuda(
      data.data_ptr<uint8_t>(), data.numel(), meta.data_ptr<int64_t>(), meta.size(0), out.data_ptr(),
      out_kind(out_dtype), total_rows, p, g, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, kPatchify, ": kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

// ---------------------------------------------------------------- scatter_image_features
//
// (embeds [R, D], mask [R] bool/uint8, features [N, D]) -> (out [R, D] contiguous in embeds' dtype, n_tokens [] int64
// on embeds' device). out = embeds with its image-token rows replaced by the feature rows in order, i.e.
// embeds.masked_scatter(mask[:, None], features.to(embeds.dtype)) when the counts agree. The op never raises on a
// count mismatch (CUDA cannot without a synchronisation, and the CPU implementation does the same so that both are
// one op): n_tokens is the count found, and every image-token row of out is NaN when n_tokens != N. The caller
// (fastvlm.ops.scatter) compares n_tokens with N and raises transformers' ValueError, when and if it reads it.

constexpr const char* kScatter = "fastvlm_ext::scatter_image_features";

bool scatter_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_scatter(const at::Tensor& embeds, const at::Tensor& mask, const at::Tensor& features) {
  TORCH_CHECK(embeds.dim() == 2 && scatter_float(embeds.scalar_type()), kScatter,
              ": inputs_embeds must be a 2-D float32/float64/bfloat16/float16 tensor [rows, dim], got ",
              embeds.scalar_type(), " of shape ", embeds.sym_sizes());
  TORCH_CHECK(mask.dim() == 1 && (mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte), kScatter,
              ": image_mask must be a 1-D bool tensor [rows], got ", mask.scalar_type(), " of shape ",
              mask.sym_sizes());
  TORCH_CHECK(features.dim() == 2 && scatter_float(features.scalar_type()), kScatter,
              ": image_features must be a 2-D float tensor [n, dim], got ", features.scalar_type(), " of shape ",
              features.sym_sizes());
  TORCH_CHECK(mask.device() == embeds.device() && features.device() == embeds.device(), kScatter,
              ": inputs_embeds, image_mask and image_features must be on one device, got ", embeds.device(), ", ",
              mask.device(), ", ", features.device());
  TORCH_SYM_CHECK(mask.sym_size(0).sym_eq(embeds.sym_size(0)), kScatter, ": image_mask has ", mask.sym_size(0),
                  " rows, inputs_embeds ", embeds.sym_size(0));
  TORCH_SYM_CHECK(features.sym_size(1).sym_eq(embeds.sym_size(1)), kScatter, ": image_features rows have width ",
                  features.sym_size(1), ", inputs_embeds ", embeds.sym_size(1));
}

// The kernels read rows with unit element stride; features of a dtype other than embeds' or float32 are cast here
// (one extra pass; float32 and same-dtype features are cast in the kernel).
struct ScatterInputs {
  at::Tensor embeds, mask, features;
};

ScatterInputs scatter_inputs(const at::Tensor& embeds, const at::Tensor& mask, const at::Tensor& features) {
  ScatterInputs in;
  in.embeds = embeds.size(1) <= 1 || embeds.stride(1) == 1 ? embeds : embeds.contiguous();
  at::Tensor f = features;
  if (f.scalar_type() != embeds.scalar_type() && f.scalar_type() != at::kFloat) f = f.to(embeds.scalar_type());
  in.features = f.size(1) <= 1 || f.stride(1) == 1 ? f : f.contiguous();
  in.mask = mask.contiguous();
  return in;
}

std::tuple<at::Tensor, at::Tensor> scatter_empty(const at::Tensor& embeds) {
  return {at::empty_symint(embeds.sym_sizes(), embeds.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty({}, embeds.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor> scatter_meta(const at::Tensor& embeds, const at::Tensor& mask,
                                                const at::Tensor& features) {
  check_scatter(embeds, mask, features);
  return scatter_empty(embeds);
}

template <typename Fn>
void dispatch_scatter(at::ScalarType out, at::ScalarType in, Fn&& fn) {
  const bool fp32_in = in == at::kFloat;
  switch (out) {
    case at::kFloat:
      fn(float{}, float{});
      break;
    case at::kDouble:
      fp32_in ? fn(double{}, float{}) : fn(double{}, double{});
      break;
    case at::kBFloat16:
      fp32_in ? fn(c10::BFloat16{}, float{}) : fn(c10::BFloat16{}, c10::BFloat16{});
      break;
    default:
      fp32_in ? fn(c10::Half{}, float{}) : fn(c10::Half{}, c10::Half{});
  }
}

std::tuple<at::Tensor, at::Tensor> scatter_cpu(const at::Tensor& embeds, const at::Tensor& mask,
                                               const at::Tensor& features) {
  check_scatter(embeds, mask, features);
  const ScatterInputs in = scatter_inputs(embeds, mask, features);
  at::Tensor out, n_tokens;
  std::tie(out, n_tokens) = scatter_empty(embeds);
  const int64_t rows = embeds.size(0), dim = embeds.size(1);
  const auto* m = static_cast<const uint8_t*>(in.mask.data_ptr());
  std::vector<int64_t> group_offsets(static_cast<size_t>(scatter_groups(rows)));
  const int64_t total = cpu::scatter_scan(m, rows, group_offsets.data());
  *n_tokens.data_ptr<int64_t>() = total;
  const bool counts_ok = total == in.features.size(0);
  dispatch_scatter(embeds.scalar_type(), in.features.scalar_type(), [&](auto out_tag, auto in_tag) {
    using OutT = decltype(out_tag);
    using InT = decltype(in_tag);
    cpu::scatter_rows(in.embeds.data_ptr<OutT>(), in.embeds.stride(0), in.features.data_ptr<InT>(),
                      in.features.stride(0), counts_ok, m, group_offsets.data(), rows, dim, out.data_ptr<OutT>(),
                      parallel_for(std::max<int64_t>(1, 65536 / std::max<int64_t>(1, dim * kScatterGroup))));
  });
  return {out, n_tokens};
}

ScatterDtype scatter_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ScatterDtype::kFloat32;
    case at::kDouble:
      return ScatterDtype::kFloat64;
    case at::kBFloat16:
      return ScatterDtype::kBFloat16;
    default:
      return ScatterDtype::kFloat16;
  }
}

std::tuple<at::Tensor, at::Tensor> scatter_cuda(const at::Tensor& embeds, const at::Tensor& mask,
                                                const at::Tensor& features) {
  // No host synchronisation: the count is found and checked on the device (scatter.cuh) and returned.
  check_scatter(embeds, mask, features);
  TORCH_CHECK(embeds.size(1) < kScatterMaxDim, kScatter, ": rows of width ", embeds.size(1),
              " are not supported (at most ", kScatterMaxDim - 1, ")");
  const c10::cuda::CUDAGuard guard(embeds.device());
  const ScatterInputs in = scatter_inputs(embeds, mask, features);
  at::Tensor out, n_tokens;
  std::tie(out, n_tokens) = scatter_empty(embeds);
  const int64_t rows = embeds.size(0), dim = embeds.size(1);
  at::Tensor group_offsets = at::empty({scatter_groups(rows)}, embeds.options().dtype(at::kLong));
  const cudaError_t err = fastvlm::scatter_image_features_cuda(
      in.embeds.data_ptr(), in.embeds.stride(0), in.features.data_ptr(), in.features.stride(0), in.features.size(0),
      in.features.scalar_type() == at::kFloat && embeds.scalar_type() != at::kFloat,
      static_cast<const uint8_t*>(in.mask.data_ptr()), rows, dim, out.data_ptr(), scatter_kind(embeds.scalar_type()),
      group_offsets.data_ptr<int64_t>(), n_tokens.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, kScatter, ": kernel launch failed: ", cudaGetErrorString(err));
  return {out, n_tokens};
}

}  // namespace
}  // namespace fastvlm

TORCH_LIBRARY(fastvlm_ext, m) {
  m.def(
      "normalize_tiles(Tensor data, Tensor meta, float[] sub, float[] div, float scale, int out_h, int out_w, "
      "float pad_value, ScalarType out_dtype) -> Tensor");
  m.def(
      "qwen2vl_patchify(Tensor data, Tensor meta, float[] sub, float[] div, float scale, int patch_size, "
      "int merge_size, int temporal_patch_size, SymInt total_rows, ScalarType out_dtype) -> Tensor");
  m.def("scatter_image_features(Tensor inputs_embeds, Tensor image_mask, Tensor image_features) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvlm_ext, CPU, m) {
  m.impl("normalize_tiles", &fastvlm::tiles_cpu);
  m.impl("qwen2vl_patchify", &fastvlm::patchify_cpu);
  m.impl("scatter_image_features", &fastvlm::scatter_cpu);
}

TORCH_LIBRARY_IMPL(fastvlm_ext, Meta, m) {
  m.impl("normalize_tiles", &fastvlm::tiles_meta);
  m.impl("qwen2vl_patchify", &fastvlm::patchify_meta);
  m.impl("scatter_image_features", &fastvlm::scatter_meta);
}

TORCH_LIBRARY_IMPL(fastvlm_ext, CUDA, m) {
  m.impl("normalize_tiles", &fastvlm::tiles_cuda);
  m.impl("qwen2vl_patchify", &fastvlm::patchify_cuda);
  m.impl("scatter_image_features", &fastvlm::scatter_cuda);
}

// ---------------------------------------------------------------- Python module (importing it registers the ops)

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME fastvlm_ext
#endif
#define FVLM_CAT_(a, b) a##b
#define FVLM_CAT(a, b) FVLM_CAT_(a, b)
#define FVLM_STR_(a) #a
#define FVLM_STR(a) FVLM_STR_(a)

PyMODINIT_FUNC FVLM_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, FVLM_STR(TORCH_EXTENSION_NAME),
                            "fastvlm's CUDA C++ kernels; the ops live in torch.ops.fastvlm_ext", -1, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod == nullptr) return nullptr;
  if (PyModule_AddIntConstant(mod, "ABI_VERSION", FASTVLM_EXT_ABI_VERSION) < 0 ||
      PyModule_AddStringConstant(mod, "NAMESPACE", "fastvlm_ext") < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
