// tfbn._core CUDA entry points: the core CUDA launchers on device tensors of any framework.
//
// Device tensors: see py/device_arrays.h. Outputs are given by the caller (y, dx, statistics), so
// the module needs no framework to allocate them; the workspace is the caller's (workspace=) or
// comes from the driver's stream-ordered allocator on the same stream. `stream` is a CUstream /
// cudaStream_t as an int (0: the legacy default stream), e.g.
// torch.cuda.current_stream().cuda_stream. Everything goes through the core's driver-API
// path (core/cuda/driver.h), as the TensorFlow kernels do.
#include "py/cuda_bindings.h"

#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/activation.h"
#include "core/batch_norm_cuda.h"
#include "core/cuda/driver.h"
#include "py/cuda_split_bindings.h"
#include "py/device_arrays.h"

namespace py = pybind11;

namespace tfbn {
namespace {

using namespace py_cuda;  // NOLINT: this file adapts device arrays only

// None or a name (Keras' aliases too) -> Activation; ValueError naming the choices.
Activation ActivationOf(const py::object& activation) {
  if (activation.is_none()) return Activation::kIdentity;
  const std::string name = py::str(activation);
  Activation a;
  if (!LookupActivation(name.c_str(), true, &a)) {
    std::string choices;
    for (int i = 0; i < kNumActivations; ++i)
      choices += std::string(i ? ", " : "") + "'" + kActivationNames[i] + "'";
    for (const ActivationAlias& alias : kActivationAliases)
      choices += std::string(", '") + alias.name + "'";
    throw py::value_error("unknown activation '" + name + "'; choices: " + choices + " or None");
  }
  return a;
}

void Forward(const py::object& x_obj, const py::object& scale, const py::object& offset,
             const py::object& mean, const py::object& variance, const py::object& y_obj,
             const py::object& batch_mean, const py::object& batch_variance,
             const py::object& mean_lo, int axis, float epsilon, bool training, int64_t stream,
             const py::object& workspace, const py::object& residual_obj,
             const py::object& activation_obj) {
  CheckEpsilon(epsilon);
  const Activation act = ActivationOf(activation_obj);
  std::vector<DeviceArray> keep;
  keep.reserve(10);  // x is a reference into it: no reallocation
  keep.push_back(ToDeviceArray(x_obj, "x", stream));
  const DeviceArray& x = keep.front();
  const cuda::DType dtype = DTypeOf(x, "x");
  const Layout layout = ViewAs(x.shape, axis);
  const int64_t C = layout.channels;
  void* y = DataLike(y_obj, "y", x, stream, &keep);
  const void* s = ChannelVector(scale, "scale", dtype, C, true, stream, &keep);
  const void* o = ChannelVector(offset, "offset", dtype, C, true, stream, &keep);
  const void* mu = ChannelVector(mean, "mean", dtype, C, training, stream, &keep);
  const void* var = ChannelVector(variance, "variance", dtype, C, training, stream, &keep);
  void* bm = ChannelVector(batch_mean, "batch_mean", dtype, C, false, stream, &keep);
  void* bv = ChannelVector(batch_variance, "batch_variance", dtype, C, false, stream, &keep);
  void* lo = ChannelVector(mean_lo, "mean_lo", dtype, C, false, stream, &keep);
  const void* res =
      residual_obj.is_none() ? nullptr : DataLike(residual_obj, "residual", x, stream, &keep);
  if (C == 0) return;
  const cuda::Stream st = AsStream(stream);
  const bool epilogue = act != Activation::kIdentity || res != nullptr;
  const size_t bytes = epilogue ? cuda::ForwardEpilogueWorkspaceBytes(dtype, layout, training)
                                : cuda::ForwardWorkspaceBytes(dtype, layout, training);
  Workspace ws(workspace, bytes, stream, st, ContextOf(bm, "batch_mean"));
  ForwardArgs args{epsilon, training};
  args.activation = act;
  cuda::Result error;
  {
    py::gil_scoped_release release;
    error = epilogue ? cuda::BatchNormForwardEpilogue(dtype, layout, x.data, s, o, mu, var, res,
                                                      args, y, bm, bv, lo, ws.get(), ws.bytes(), st)
                     : cuda::BatchNormForward(dtype, layout, x.data, s, o, mu, var, args, y, bm, bv,
                                              lo, ws.get(), ws.bytes(), st);
  }
  Check(error, "batch_norm_forward launch");
}

void Backward(const py::object& dy_obj, const py::object& x_obj, const py::object& scale,
              const py::object& mean, const py::object& variance, const py::object& mean_lo,
              const py::object& d_batch_mean, const py::object& d_batch_variance,
              const py::object& dx_obj, const py::object& dscale_obj, const py::object& doffset_obj,
              int axis, float epsilon, bool training, int64_t stream, const py::object& workspace,
              const py::object& offset, const py::object& residual_obj,
              const py::object& activation_obj, const py::object& dresidual_obj) {
  CheckEpsilon(epsilon);
  const Activation act = ActivationOf(activation_obj);
  std::vector<DeviceArray> keep;
  keep.reserve(14);  // x is a reference into it: no reallocation
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
  const void* dm = ChannelVector(d_batch_mean, "d_batch_mean", dtype, C, true, stream, &keep);
  const void* dv =
      ChannelVector(d_batch_variance, "d_batch_variance", dtype, C, true, stream, &keep);
  void* ds = ChannelVector(dscale_obj, "dscale", dtype, C, false, stream, &keep);
  void* dof = ChannelVector(doffset_obj, "doffset", dtype, C, false, stream, &keep);
  const void* o = ChannelVector(offset, "offset", dtype, C, true, stream, &keep);
  const void* res =
      residual_obj.is_none() ? nullptr : DataLike(residual_obj, "residual", x, stream, &keep);
  void* dres =
      dresidual_obj.is_none() ? nullptr : DataLike(dresidual_obj, "dresidual", x, stream, &keep);
  if (C == 0) return;
  const cuda::Stream st = AsStream(stream);
  // dresidual alone (identity, no residual) also takes the epilogue path, which writes it.
  const bool epilogue = act != Activation::kIdentity || res != nullptr || dres != nullptr;
  const size_t bytes = epilogue ? cuda::BackwardEpilogueWorkspaceBytes(dtype, layout)
                                : cuda::BackwardWorkspaceBytes(dtype, layout);
  Workspace ws(workspace, bytes, stream, st, ContextOf(ds, "dscale"));
  ForwardArgs args{epsilon, training};
  args.activation = act;
  cuda::Result error;
  {
    py::gil_scoped_release release;
    error = epilogue ? cuda::BatchNormBackwardEpilogue(dtype, layout, dy, x.data, s, o, res, mu, lo,
                                                       var, dm, dv, args, dx, dres, ds, dof,
                                                       ws.get(), ws.bytes(), st)
                     : cuda::BatchNormBackward(dtype, layout, dy, x.data, s, mu, lo, var, dm, dv,
                                               args, dx, ds, dof, ws.get(), ws.bytes(), st);
  }
  Check(error, "batch_norm_backward launch");
}

size_t WorkspaceBytes(const std::vector<int64_t>& shape, const std::string& dtype, int axis,
                      bool training, bool backward, bool epilogue) {
  DeviceArray a;
  a.dtype = dtype;
  const cuda::DType t = DTypeOf(a, "dtype");
  const Layout layout = ViewAs(shape, axis);
  if (epilogue)
    return backward ? cuda::BackwardEpilogueWorkspaceBytes(t, layout)
                    : cuda::ForwardEpilogueWorkspaceBytes(t, layout, training);
  return backward ? cuda::BackwardWorkspaceBytes(t, layout)
                  : cuda::ForwardWorkspaceBytes(t, layout, training);
}

}  // namespace

void RegisterCudaBindings(py::module_& m) {
  m.attr("cuda_built") = true;
  RegisterCudaSplitBindings(m);
  m.def(
      "cuda_available", [] { return cuda::DeviceCount() > 0; },
      "Whether a CUDA driver and a device are present (opens libcuda.so.1 at the first call).");
  m.def("cuda_device_count", &cuda::DeviceCount);
  m.def("cuda_compiler_version", &cuda::CompilerVersion,
        "Version of NVRTC, which compiled the embedded kernels, e.g. 12050 (no driver needed).");
  m.def(
      "cuda_architectures", [] { return std::string(cuda::Architectures()); },
      "The embedded kernel images, e.g. 'sm_60 sm_70 ... sm_90 compute_90'.");
  m.def(
      "cuda_image_compression", [] { return std::string(cuda::ImageCompression()); },
      "How the kernel images are embedded: 'zlib' (inflated at their first use) or 'none'.");
  m.def(
      "cuda_image",
      [](const std::string& arch) {
        std::string error;
        std::string image = cuda::InflatedImage(arch, &error);
        if (!error.empty()) throw py::value_error("cuda_image: " + error);
        return py::bytes(image);
      },
      py::arg("arch"),
      "One embedded kernel image as the driver gets it: the cubin of 'sm_XX', or the "
      "NUL-terminated PTX of 'compute_XX' (no driver needed).");
  m.def("cuda_driver_version", &cuda::DriverVersion, "CUDA driver version, 0 without one.");
  m.def("cuda_workspace_bytes", &WorkspaceBytes, py::arg("shape"), py::arg("dtype"), py::kw_only(),
        py::arg("axis") = -1, py::arg("training") = true, py::arg("backward") = false,
        py::arg("epilogue") = false,
        "Device workspace bytes cuda_batch_norm_forward/backward need for this shape "
        "(epilogue: with a residual or an activation).");
  m.def("cuda_batch_norm_forward", &Forward, py::arg("x"), py::arg("scale") = py::none(),
        py::arg("offset") = py::none(), py::arg("mean") = py::none(),
        py::arg("variance") = py::none(), py::kw_only(), py::arg("y"), py::arg("batch_mean"),
        py::arg("batch_variance"), py::arg("mean_lo"), py::arg("axis") = -1,
        py::arg("epsilon") = 1e-3f, py::arg("training") = true, py::arg("stream") = 0,
        py::arg("workspace") = py::none(), py::arg("residual") = py::none(),
        py::arg("activation") = py::none(),
        "Fused BN forward on CUDA device tensors; writes y, batch_mean, batch_variance, "
        "mean_lo (given by the caller). With residual (x's dtype and shape) and/or activation "
        "('identity', 'relu', 'relu6', 'silu'; None: identity) y = act(BN(x) + residual). "
        "Enqueued on `stream`, returns without waiting.");
  m.def("cuda_batch_norm_backward", &Backward, py::arg("dy"), py::arg("x"),
        py::arg("scale") = py::none(), py::arg("mean") = py::none(),
        py::arg("variance") = py::none(), py::arg("mean_lo") = py::none(),
        py::arg("d_batch_mean") = py::none(), py::arg("d_batch_variance") = py::none(),
        py::kw_only(), py::arg("dx"), py::arg("dscale"), py::arg("doffset"), py::arg("axis") = -1,
        py::arg("epsilon") = 1e-3f, py::arg("training") = true, py::arg("stream") = 0,
        py::arg("workspace") = py::none(), py::arg("offset") = py::none(),
        py::arg("residual") = py::none(), py::arg("activation") = py::none(),
        py::arg("dresidual") = py::none(),
        "Gradient of cuda_batch_norm_forward; writes dx, dscale, doffset (given by the "
        "caller), and dresidual (the gradient of the residual, optional). offset, residual and "
        "activation: as given to the forward. Enqueued on `stream`, returns without waiting.");
}

}  // namespace tfbn
