// tfbn._core CUDA entry points of the split op family (statistics | merge | apply and the
// gradient's sums | apply), the core's launchers on device tensors. The conventions are
// cuda_bindings.cc's: outputs given by the caller, the workspace the caller's or from the
// stream-ordered allocator, `stream` a CUstream as an int. Partials, sums and counts are
// float64 device tensors; weights float32 with x's shape less the channel axis.
#include "py/cuda_split_bindings.h"

#include <cstdint>
#include <string>
#include <vector>

#include "core/batch_norm_cuda.h"
#include "py/device_arrays.h"

namespace py = pybind11;

namespace tfbn {
namespace {

using namespace py_cuda;  // NOLINT: this file adapts device arrays only

constexpr int kMaxKept = 16;  // keep.reserve: references into it stay valid

// The positions of x (its shape less the channel axis), one weight each.
std::vector<int64_t> WeightShape(const std::vector<int64_t>& shape, int axis) {
  const int rank = static_cast<int>(shape.size());
  const int a = axis < 0 ? axis + rank : axis;
  std::vector<int64_t> w;
  for (int d = 0; d < rank; ++d)
    if (d != a) w.push_back(shape[d]);
  return w;
}

void PyPartialMoments(const py::object& x_obj, const py::object& weights, const py::object& partial,
                      int axis, int64_t stream, const py::object& workspace) {
  std::vector<DeviceArray> keep;
  keep.reserve(kMaxKept);
  keep.push_back(ToDeviceArray(x_obj, "x", stream));
  const DeviceArray& x = keep.front();
  const cuda::DType dtype = DTypeOf(x, "x");
  const Layout layout = ViewAs(x.shape, axis);
  const int64_t C = layout.channels;
  const auto* w = static_cast<const float*>(
      TensorOf(weights, "weights", "float32", WeightShape(x.shape, axis), true, stream, &keep));
  auto* p = static_cast<double*>(
      TensorOf(partial, "partial", "float64", {kPartialRows, C}, false, stream, &keep));
  if (C == 0) return;
  const cuda::Stream st = AsStream(stream);
  Workspace ws(workspace, cuda::StatsWorkspaceBytes(dtype, layout, w != nullptr), stream, st,
               ContextOf(p, "partial"));
  cuda::Result error;
  {
    py::gil_scoped_release release;
    error = cuda::PartialMoments(dtype, layout, x.data, w, p, ws.get(), ws.bytes(), st);
  }
  Check(error, "partial_moments launch");
}

void PyMergeMoments(const py::object& partials_obj, const py::object& mean,
                    const py::object& variance, const py::object& mean_lo, const py::object& count,
                    int64_t stream) {
  std::vector<DeviceArray> keep;
  keep.reserve(kMaxKept);
  keep.push_back(ToDeviceArray(partials_obj, "partials", stream));
  const DeviceArray& partials = keep.front();
  if (partials.dtype != "float64" || partials.shape.size() != 3 ||
      partials.shape[1] != kPartialRows)
    Fail("partials must be float64 (parts, 3, C), got " + partials.dtype + " " +
         ShapeString(partials.shape));
  const int64_t parts = partials.shape[0], C = partials.shape[2];
  if (mean.is_none()) Fail("mean is required");
  const DeviceArray m = ToDeviceArray(mean, "mean", stream);
  if (m.dtype != "float32" && m.dtype != "float64")
    Fail("mean must be float32 or float64, got " + m.dtype);
  const cuda::DType param = m.dtype == "float64" ? cuda::DType::kDouble : cuda::DType::kFloat;
  void* mu = ChannelVector(mean, "mean", param, C, false, stream, &keep);
  void* var = ChannelVector(variance, "variance", param, C, false, stream, &keep);
  void* lo = ChannelVector(mean_lo, "mean_lo", param, C, false, stream, &keep);
  auto* n = static_cast<double*>(TensorOf(count, "count", "float64", {C}, false, stream, &keep));
  if (C == 0) return;
  const cuda::Stream st = AsStream(stream);
  cuda::Result error;
  {
    py::gil_scoped_release release;
    error = cuda::MergeMoments(param, parts, C, static_cast<const double*>(partials.data), mu, var,
                               lo, n, st);
  }
  Check(error, "merge_moments launch");
}

void PyApplyStatistics(const py::object& x_obj, const py::object& scale, const py::object& offset,
                       const py::object& mean, const py::object& variance,
                       const py::object& mean_lo, const py::object& y_obj, int axis, float epsilon,
                       int64_t stream, const py::object& workspace) {
  CheckEpsilon(epsilon);
  std::vector<DeviceArray> keep;
  keep.reserve(kMaxKept);
  keep.push_back(ToDeviceArray(x_obj, "x", stream));
  const DeviceArray& x = keep.front();
  const cuda::DType dtype = DTypeOf(x, "x");
  const Layout layout = ViewAs(x.shape, axis);
  const int64_t C = layout.channels;
  void* y = DataLike(y_obj, "y", x, stream, &keep);
  const void* s = ChannelVector(scale, "scale", dtype, C, true, stream, &keep);
  const void* o = ChannelVector(offset, "offset", dtype, C, true, stream, &keep);
  const void* mu = ChannelVector(mean, "mean", dtype, C, false, stream, &keep);
  const void* var = ChannelVector(variance, "variance", dtype, C, false, stream, &keep);
  const void* lo = ChannelVector(mean_lo, "mean_lo", dtype, C, true, stream, &keep);
  if (C == 0) return;
  const cuda::Stream st = AsStream(stream);
  Workspace ws(workspace, cuda::ApplyWorkspaceBytes(dtype, layout), stream, st,
               ContextOf(mu, "mean"));
  cuda::Result error;
  {
    py::gil_scoped_release release;
    error = cuda::ApplyStatistics(dtype, layout, x.data, s, o, mu, lo, var, epsilon, y, ws.get(),
                                  ws.bytes(), st);
  }
  Check(error, "apply_statistics launch");
}

void PyGradSums(const py::object& dy_obj, const py::object& x_obj, const py::object& mean,
                const py::object& mean_lo, const py::object& sums, int axis, int64_t stream,
                const py::object& workspace) {
  std::vector<DeviceArray> keep;
  keep.reserve(kMaxKept);
  keep.push_back(ToDeviceArray(x_obj, "x", stream));
  const DeviceArray& x = keep.front();
  const cuda::DType dtype = DTypeOf(x, "x");
  const Layout layout = ViewAs(x.shape, axis);
  const int64_t C = layout.channels;
  const void* dy = DataLike(dy_obj, "dy", x, stream, &keep);
  const void* mu = ChannelVector(mean, "mean", dtype, C, false, stream, &keep);
  const void* lo = ChannelVector(mean_lo, "mean_lo", dtype, C, true, stream, &keep);
  auto* out = static_cast<double*>(TensorOf(sums, "sums", "float64", {2, C}, false, stream, &keep));
  if (C == 0) return;
  const cuda::Stream st = AsStream(stream);
  Workspace ws(workspace, cuda::GradSumsWorkspaceBytes(dtype, layout), stream, st,
               ContextOf(out, "sums"));
  cuda::Result error;
  {
    py::gil_scoped_release release;
    error = cuda::GradSums(dtype, layout, dy, x.data, mu, lo, out, ws.get(), ws.bytes(), st);
  }
  Check(error, "grad_sums launch");
}

void PyApplyGradWithSums(const py::object& dy_obj, const py::object& x_obj, const py::object& scale,
                         const py::object& mean, const py::object& variance,
                         const py::object& mean_lo, const py::object& local_sums,
                         const py::object& global_sums, const py::object& count,
                         const py::object& weights, const py::object& dx_obj,
                         const py::object& dscale_obj, const py::object& doffset_obj, int axis,
                         float epsilon, int64_t stream, const py::object& workspace) {
  CheckEpsilon(epsilon);
  std::vector<DeviceArray> keep;
  keep.reserve(kMaxKept);
  keep.push_back(ToDeviceArray(x_obj, "x", stream));
  const DeviceArray& x = keep.front();
  const cuda::DType dtype = DTypeOf(x, "x");
  const Layout layout = ViewAs(x.shape, axis);
  const int64_t C = layout.channels;
  const void* dy = DataLike(dy_obj, "dy", x, stream, &keep);
  void* dx = DataLike(dx_obj, "dx", x, stream, &keep);
  const void* s = ChannelVector(scale, "scale", dtype, C, true, stream, &keep);
  const void* mu = ChannelVector(mean, "mean", dtype, C, false, stream, &keep);
  const void* var = ChannelVector(variance, "variance", dtype, C, false, stream, &keep);
  const void* lo = ChannelVector(mean_lo, "mean_lo", dtype, C, true, stream, &keep);
  const auto* local = static_cast<const double*>(
      TensorOf(local_sums, "local_sums", "float64", {2, C}, false, stream, &keep));
  if (global_sums.is_none()) Fail("global_sums is required");
  const DeviceArray g = ToDeviceArray(global_sums, "global_sums", stream);
  const int64_t rows = g.shape.size() == 2 && (g.shape[0] == 2 || g.shape[0] == 4) ? g.shape[0] : 2;
  const auto* global = static_cast<const double*>(
      TensorOf(global_sums, "global_sums", "float64", {rows, C}, false, stream, &keep));
  const auto* n =
      static_cast<const double*>(TensorOf(count, "count", "float64", {C}, false, stream, &keep));
  const auto* w = static_cast<const float*>(
      TensorOf(weights, "weights", "float32", WeightShape(x.shape, axis), true, stream, &keep));
  void* ds = ChannelVector(dscale_obj, "dscale", dtype, C, false, stream, &keep);
  void* dof = ChannelVector(doffset_obj, "doffset", dtype, C, false, stream, &keep);
  if (C == 0) return;
  const cuda::Stream st = AsStream(stream);
  Workspace ws(workspace, cuda::GradApplyWorkspaceBytes(dtype, layout), stream, st,
               ContextOf(ds, "dscale"));
  cuda::Result error;
  {
    py::gil_scoped_release release;
    error = cuda::ApplyGradWithSums(dtype, layout, dy, x.data, s, mu, lo, var, local, global, rows,
                                    n, w, epsilon, dx, ds, dof, ws.get(), ws.bytes(), st);
  }
  Check(error, "apply_grad_with_sums launch");
}

}  // namespace

void RegisterCudaSplitBindings(py::module_& m) {
  m.def("cuda_partial_moments", &PyPartialMoments, py::arg("x"), py::arg("weights") = py::none(),
        py::kw_only(), py::arg("partial"), py::arg("axis") = -1, py::arg("stream") = 0,
        py::arg("workspace") = py::none(),
        "Partial statistics of x's slice of the batch into partial, float64 (3, C): count "
        "(or weight sum), mean, M2. weights: float32 with x's shape less the channel axis.");
  m.def("cuda_merge_moments", &PyMergeMoments, py::arg("partials"), py::kw_only(), py::arg("mean"),
        py::arg("variance"), py::arg("mean_lo"), py::arg("count"), py::arg("stream") = 0,
        "Merges partials, float64 (parts, 3, C), in part order into mean, variance, mean_lo "
        "(float32 or float64) and count (float64); NaN statistics where the count is 0.");
  m.def("cuda_apply_statistics", &PyApplyStatistics, py::arg("x"), py::arg("scale") = py::none(),
        py::arg("offset") = py::none(), py::arg("mean") = py::none(),
        py::arg("variance") = py::none(), py::arg("mean_lo") = py::none(), py::kw_only(),
        py::arg("y"), py::arg("axis") = -1, py::arg("epsilon") = 1e-3f, py::arg("stream") = 0,
        py::arg("workspace") = py::none(),
        "y = ((x - mean) - mean_lo) * rsqrt(variance + epsilon) * scale + offset.");
  m.def("cuda_grad_sums", &PyGradSums, py::arg("dy"), py::arg("x"), py::arg("mean") = py::none(),
        py::arg("mean_lo") = py::none(), py::kw_only(), py::arg("sums"), py::arg("axis") = -1,
        py::arg("stream") = 0, py::arg("workspace") = py::none(),
        "sums, float64 (2, C): sum dy and sum dy * ((x - mean) - mean_lo).");
  m.def("cuda_apply_grad_with_sums", &PyApplyGradWithSums, py::arg("dy"), py::arg("x"),
        py::arg("scale") = py::none(), py::arg("mean") = py::none(),
        py::arg("variance") = py::none(), py::arg("mean_lo") = py::none(),
        py::arg("local_sums") = py::none(), py::arg("global_sums") = py::none(),
        py::arg("count") = py::none(), py::arg("weights") = py::none(), py::kw_only(),
        py::arg("dx"), py::arg("dscale"), py::arg("doffset"), py::arg("axis") = -1,
        py::arg("epsilon") = 1e-3f, py::arg("stream") = 0, py::arg("workspace") = py::none(),
        "The gradient from this slice's sums (local_sums, float64 (2, C): dscale, doffset) "
        "and the whole batch's (global_sums, float64 (2 or 4, C); count, float64 (C,): its "
        "elements or weight sum per channel); weights as in cuda_partial_moments.");
}

}  // namespace tfbn
