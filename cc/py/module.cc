// pybind11 module tfbn._core: the core CPU kernels on NumPy arrays, without TensorFlow.
// Used by the tests (core vs. a float64 reference) and by the benchmarks (bandwidth floor).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/ThreadPool>

#include "core/batch_norm.h"
#if TFBN_WITH_CUDA
#include "py/cuda_bindings.h"
#endif

namespace py = pybind11;

namespace tfbn {
namespace {

// Worker threads kept for the process, one pool per thread count: starting threads on
// every pass would cost more than a pass over a cache-sized tensor, and the benchmarks
// compare these kernels with the op on TensorFlow's pool.
Eigen::ThreadPool& Workers(int threads) {
  static std::mutex mu;
  static std::map<int, std::unique_ptr<Eigen::ThreadPool>> pools;
  std::lock_guard<std::mutex> lock(mu);
  auto& pool = pools[threads];
  if (!pool) pool = std::make_unique<Eigen::ThreadPool>(threads - 1);  // + the caller
  return *pool;
}

// Splits [0, n) into one contiguous range per thread, the first on the calling thread. The
// core's results do not depend on how the work is split.
ParallelFor ThreadsFor(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return [threads](int64_t n, int64_t, const RangeFn& fn) {
    const int64_t k = std::min<int64_t>(threads, n);
    if (k <= 1) {
      if (n > 0) fn(0, n);
      return;
    }
    Eigen::ThreadPool& pool = Workers(threads);
    Eigen::Barrier done(static_cast<unsigned>(k - 1));
    for (int64_t t = 1; t < k; ++t)
      pool.Schedule([&fn, &done, n, k, t] {
        fn(n * t / k, n * (t + 1) / k);
        done.Notify();
      });
    fn(0, n / k);
    done.Wait();
  };
}

enum class Kind { kHalf, kBFloat16, kFloat, kDouble };

Kind KindOf(const py::array& a, const char* name) {
  const py::dtype dt = a.dtype();
  if (!py::cast<bool>(dt.attr("isnative")))
    throw std::invalid_argument(std::string("tfbn: ") + name +
                                " must be in the machine's byte order, got dtype " +
                                std::string(py::str(dt)));
  const std::string dname = py::str(dt.attr("name"));
  if (dname == "float16") return Kind::kHalf;
  if (dname == "bfloat16") return Kind::kBFloat16;
  if (dname == "float32") return Kind::kFloat;
  if (dname == "float64") return Kind::kDouble;
  throw std::invalid_argument(std::string("tfbn: ") + name +
                              " must be float16, bfloat16, float32 or float64, got " + dname);
}

py::array Contiguous(const py::array& a) {
  if (a.flags() & py::array::c_style) return a;
  return py::module_::import("numpy").attr("ascontiguousarray")(a);
}

Layout ViewAs(const py::array& x, int axis) {
  const int rank = static_cast<int>(x.ndim());
  if (rank < 2)
    throw std::invalid_argument("tfbn: x must have rank >= 2, got rank " + std::to_string(rank));
  if (axis < -rank || axis >= rank)
    throw std::invalid_argument("tfbn: axis = " + std::to_string(axis) +
                                " is out of range for x of rank " + std::to_string(rank));
  if (axis < 0) axis += rank;
  Layout layout{1, x.shape(axis), 1};
  for (int d = 0; d < axis; ++d) layout.outer *= x.shape(d);
  for (int d = axis + 1; d < rank; ++d) layout.inner *= x.shape(d);
  return layout;
}

// A per-channel vector as a contiguous array of U; None gives an empty array.
template <typename U>
py::array_t<U> ChannelVector(const py::object& v, const char* name, int64_t channels,
                             bool allow_none) {
  if (v.is_none()) {
    if (allow_none) return py::array_t<U>(0);
    throw std::invalid_argument(std::string("tfbn: ") + name + " is required");
  }
  auto a = py::array_t<U, py::array::c_style | py::array::forcecast>::ensure(v);
  if (!a || a.ndim() != 1 || a.shape(0) != channels)
    throw std::invalid_argument(std::string("tfbn: ") + name +
                                " must be a vector of length C = " + std::to_string(channels));
  return a;
}

template <typename U>
const U* PtrOrNull(const py::array_t<U>& a) {
  return a.size() == 0 ? nullptr : a.data();
}

void CheckEpsilon(float epsilon) {
  if (!(epsilon > 0.0f && std::isfinite(epsilon)))
    throw std::invalid_argument("tfbn: epsilon must be positive and finite, got " +
                                std::to_string(epsilon));
}

// The epilogue's activation by name (core/activation.h's names and Keras' aliases; None is
// identity).
Activation ParseActivation(const py::object& activation) {
  if (activation.is_none()) return Activation::kIdentity;
  Activation parsed;
  if (py::isinstance<py::str>(activation) &&
      LookupActivation(py::cast<std::string>(activation).c_str(), /*allow_aliases=*/true, &parsed))
    return parsed;
  std::string names = "None";
  for (const char* name : kActivationNames) names += std::string(", '") + name + "'";
  for (const ActivationAlias& alias : kActivationAliases)
    names += std::string(", '") + alias.name + "'";
  throw std::invalid_argument("tfbn: activation must be one of " + names +
                              ", got activation=" + std::string(py::repr(activation)));
}

// The epilogue's residual: None, or an array of x's dtype and shape (made contiguous).
std::optional<py::array> ResidualOf(const py::object& residual, const py::array& x) {
  if (residual.is_none()) return std::nullopt;
  py::array r = py::array::ensure(residual);
  if (!r)
    throw std::invalid_argument("tfbn: residual must be an array of x's dtype and shape, got " +
                                std::string(py::repr(residual)));
  if (!r.dtype().is(x.dtype()) || r.ndim() != x.ndim() ||
      !std::equal(x.shape(), x.shape() + x.ndim(), r.shape()))
    throw std::invalid_argument(
        "tfbn: residual must have the dtype and shape of x (" + std::string(py::str(x.dtype())) +
        ", " + std::string(py::str(x.attr("shape"))) + "), got residual of dtype " +
        std::string(py::str(r.dtype())) + ", shape " + std::string(py::str(r.attr("shape"))));
  r = Contiguous(r);
  return r;
}

// Where the kernel writes y (forward) or dx (backward): a new array, or `out`, an existing
// writable C-contiguous array of x's dtype and shape (it may be x itself: every element is
// read before it is written). The benchmarks pass one so that NumPy's allocation of a fresh
// output on every call is not timed.
py::array OutputLike(const py::object& out, const py::array& x) {
  const std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  if (out.is_none()) return py::array(x.dtype(), shape);
  if (!py::isinstance<py::array>(out))
    throw std::invalid_argument("tfbn: out must be a NumPy array of x's dtype and shape, got " +
                                std::string(py::repr(out.get_type())));
  py::array a = py::reinterpret_borrow<py::array>(out);
  if (!a.dtype().is(x.dtype()) || a.ndim() != x.ndim() ||
      !std::equal(shape.begin(), shape.end(), a.shape()))
    throw std::invalid_argument(
        "tfbn: out must have the dtype and shape of x (" + std::string(py::str(x.dtype())) + ", " +
        std::string(py::str(x.attr("shape"))) + "), got out of dtype " +
        std::string(py::str(a.dtype())) + ", shape " + std::string(py::str(a.attr("shape"))));
  if (!(a.flags() & py::array::c_style) || !a.writeable())
    throw std::invalid_argument("tfbn: out must be C-contiguous and writable");
  return a;
}

template <typename T, typename U>
py::tuple Forward(py::array x, const py::object& scale, const py::object& offset,
                  const py::object& mean, const py::object& variance,
                  const std::optional<py::array>& residual, Activation activation, int axis,
                  float epsilon, bool training, int threads, const py::object& out) {
  const Layout layout = ViewAs(x, axis);
  const int64_t C = layout.channels;
  auto s = ChannelVector<U>(scale, "scale", C, true);
  auto o = ChannelVector<U>(offset, "offset", C, true);
  auto mu = ChannelVector<U>(mean, "mean", C, training);
  auto var = ChannelVector<U>(variance, "variance", C, training);
  py::array y = OutputLike(out, x);
  py::array_t<U> bm(C), bv(C), mean_lo(C);
  const T* xp = static_cast<const T*>(x.data());
  const T* resp = residual ? static_cast<const T*>(residual->data()) : nullptr;
  T* yp = static_cast<T*>(y.mutable_data());
  const U *sp = PtrOrNull(s), *op = PtrOrNull(o), *mp = PtrOrNull(mu), *vp = PtrOrNull(var);
  U *bmp = bm.mutable_data(), *bvp = bv.mutable_data(), *lop = mean_lo.mutable_data();
  {
    py::gil_scoped_release release;
    BatchNormForwardEpilogue<T, U>(layout, xp, sp, op, mp, vp, resp,
                                   ForwardArgs{epsilon, training, activation}, yp, bmp, bvp, lop,
                                   ThreadsFor(threads));
  }
  return py::make_tuple(y, bm, bv, mean_lo);
}

template <typename T, typename U>
py::tuple Backward(py::array dy, py::array x, const py::object& scale, const py::object& mean,
                   const py::object& variance, const py::object& mean_lo,
                   const py::object& d_batch_mean, const py::object& d_batch_variance,
                   const py::object& offset, const std::optional<py::array>& residual,
                   Activation activation, int axis, float epsilon, bool training, int threads,
                   const py::object& out) {
  const Layout layout = ViewAs(x, axis);
  const int64_t C = layout.channels;
  auto s = ChannelVector<U>(scale, "scale", C, true);
  auto mu = ChannelVector<U>(mean, "mean", C, false);
  auto var = ChannelVector<U>(variance, "variance", C, false);
  auto lo = ChannelVector<U>(mean_lo, "mean_lo", C, true);
  auto dm = ChannelVector<U>(d_batch_mean, "d_batch_mean", C, true);
  auto dv = ChannelVector<U>(d_batch_variance, "d_batch_variance", C, true);
  auto o = ChannelVector<U>(offset, "offset", C, true);
  const std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  py::array dx = OutputLike(out, x);
  py::array dres(x.dtype(), residual ? shape : std::vector<py::ssize_t>{0});
  py::array_t<U> dscale(C), doffset(C);
  const T* dyp = static_cast<const T*>(dy.data());
  const T* xp = static_cast<const T*>(x.data());
  T* dxp = static_cast<T*>(dx.mutable_data());
  const U *sp = PtrOrNull(s), *mp = mu.data(), *vp = var.data(), *lop = PtrOrNull(lo),
          *dmp = PtrOrNull(dm), *dvp = PtrOrNull(dv), *offp = PtrOrNull(o);
  const T* resp = residual ? static_cast<const T*>(residual->data()) : nullptr;
  T* dresp = residual ? static_cast<T*>(dres.mutable_data()) : nullptr;
  U *dsp = dscale.mutable_data(), *dop = doffset.mutable_data();
  {
    py::gil_scoped_release release;
    BatchNormBackwardEpilogue<T, U>(layout, dyp, xp, sp, offp, resp, mp, lop, vp, dmp, dvp,
                                    ForwardArgs{epsilon, training, activation}, dxp, dresp, dsp,
                                    dop, ThreadsFor(threads));
  }
  if (residual) return py::make_tuple(dx, dscale, doffset, dres);
  return py::make_tuple(dx, dscale, doffset);
}

py::tuple ForwardAny(py::array x, const py::object& scale, const py::object& offset,
                     const py::object& mean, const py::object& variance, int axis, float epsilon,
                     bool training, int threads, const py::object& residual,
                     const py::object& activation, const py::object& out) {
  CheckEpsilon(epsilon);
  x = Contiguous(x);
  const Activation act = ParseActivation(activation);
  const auto res = ResidualOf(residual, x);
  switch (KindOf(x, "x")) {
    case Kind::kHalf:
      return Forward<Eigen::half, float>(x, scale, offset, mean, variance, res, act, axis, epsilon,
                                         training, threads, out);
    case Kind::kBFloat16:
      return Forward<Eigen::bfloat16, float>(x, scale, offset, mean, variance, res, act, axis,
                                             epsilon, training, threads, out);
    case Kind::kFloat:
      return Forward<float, float>(x, scale, offset, mean, variance, res, act, axis, epsilon,
                                   training, threads, out);
    case Kind::kDouble:
      break;
  }
  return Forward<double, double>(x, scale, offset, mean, variance, res, act, axis, epsilon,
                                 training, threads, out);
}

py::tuple BackwardAny(py::array dy, py::array x, const py::object& scale, const py::object& mean,
                      const py::object& variance, const py::object& mean_lo,
                      const py::object& d_batch_mean, const py::object& d_batch_variance, int axis,
                      float epsilon, bool training, int threads, const py::object& offset,
                      const py::object& residual, const py::object& activation,
                      const py::object& out) {
  CheckEpsilon(epsilon);
  x = Contiguous(x);
  dy = Contiguous(dy);
  const Kind kind = KindOf(x, "x");
  if (KindOf(dy, "dy") != kind || dy.ndim() != x.ndim() ||
      !std::equal(x.shape(), x.shape() + x.ndim(), dy.shape()))
    throw std::invalid_argument("tfbn: dy must have the dtype and shape of x");
  const Activation act = ParseActivation(activation);
  const auto res = ResidualOf(residual, x);
  switch (kind) {
    case Kind::kHalf:
      return Backward<Eigen::half, float>(dy, x, scale, mean, variance, mean_lo, d_batch_mean,
                                          d_batch_variance, offset, res, act, axis, epsilon,
                                          training, threads, out);
    case Kind::kBFloat16:
      return Backward<Eigen::bfloat16, float>(dy, x, scale, mean, variance, mean_lo, d_batch_mean,
                                              d_batch_variance, offset, res, act, axis, epsilon,
                                              training, threads, out);
    case Kind::kFloat:
      return Backward<float, float>(dy, x, scale, mean, variance, mean_lo, d_batch_mean,
                                    d_batch_variance, offset, res, act, axis, epsilon, training,
                                    threads, out);
    case Kind::kDouble:
      break;
  }
  return Backward<double, double>(dy, x, scale, mean, variance, mean_lo, d_batch_mean,
                                  d_batch_variance, offset, res, act, axis, epsilon, training,
                                  threads, out);
}

// Streaming copy of src into dst on `threads` threads, with the kernels' non-temporal
// stores: the memory-bandwidth yardstick of the benchmarks (it moves 2 x nbytes).
void StreamCopyBuffers(const py::buffer& src, py::buffer dst, int threads) {
  const py::buffer_info in = src.request(), out = dst.request(true);
  const int64_t nbytes = in.size * in.itemsize;
  if (out.size * out.itemsize != nbytes)
    throw std::invalid_argument("tfbn: stream_copy needs src and dst of the same byte size");
  py::gil_scoped_release release;
  StreamCopy(in.ptr, out.ptr, nbytes, ThreadsFor(threads));
}

py::dict CpuInstructionSetInfo() {
  py::dict info;
  info["isa"] = CpuInstructionSet();
  info["supported"] = py::str(CpuInstructionSetsSupported()).attr("split")();
  const std::string requested = CpuInstructionSetRequested();
  const std::string warning = CpuInstructionSetWarning();
  info["requested"] = requested.empty() ? py::object(py::none()) : py::str(requested);
  info["warning"] = warning.empty() ? py::object(py::none()) : py::str(warning);
  return info;
}

}  // namespace
}  // namespace tfbn

PYBIND11_MODULE(_core, m) {
  m.doc() = "tfbn core kernels on NumPy arrays (CPU), without TensorFlow.";
  m.def("batch_norm_forward", &tfbn::ForwardAny, py::arg("x"), py::arg("scale") = py::none(),
        py::arg("offset") = py::none(), py::arg("mean") = py::none(),
        py::arg("variance") = py::none(), py::kw_only(), py::arg("axis") = -1,
        py::arg("epsilon") = 1e-3f, py::arg("training") = true, py::arg("threads") = 0,
        py::arg("residual") = py::none(), py::arg("activation") = py::none(),
        py::arg("out") = py::none(),
        "Returns (y, batch_mean, batch_variance, mean_lo); with residual and/or activation, "
        "y = activation(BN(x) + residual). out: an array of x's dtype and shape to write y "
        "into (C-contiguous, writable; may be x) instead of a new one.");
  m.def("batch_norm_backward", &tfbn::BackwardAny, py::arg("dy"), py::arg("x"),
        py::arg("scale") = py::none(), py::arg("mean") = py::none(),
        py::arg("variance") = py::none(), py::arg("mean_lo") = py::none(),
        py::arg("d_batch_mean") = py::none(), py::arg("d_batch_variance") = py::none(),
        py::kw_only(), py::arg("axis") = -1, py::arg("epsilon") = 1e-3f, py::arg("training") = true,
        py::arg("threads") = 0, py::arg("offset") = py::none(), py::arg("residual") = py::none(),
        py::arg("activation") = py::none(), py::arg("out") = py::none(),
        "Returns (dx, dscale, doffset), and dresidual last where residual is given. The "
        "epilogue's gradient recomputes its input from x, the statistics, scale, offset and "
        "residual. out: an array of x's dtype and shape to write dx into (C-contiguous, "
        "writable; may be dy or x) instead of a new one.");
  m.def("stream_copy", &tfbn::StreamCopyBuffers, py::arg("src"), py::arg("dst"), py::kw_only(),
        py::arg("threads") = 0, "Copies src into dst (same byte size) on `threads` threads.");
  m.def("cpu_instruction_set", &tfbn::CpuInstructionSet,
        "The instruction set whose CPU kernels run here: avx512_bf16, avx512, avx2 or generic "
        "(the best supported, or the one TFBN_CPU_ISA names where this processor supports "
        "it).");
  m.def("cpu_instruction_set_info", &tfbn::CpuInstructionSetInfo,
        "The CPU kernels' instruction set: a dict of 'isa' (the one that runs), 'supported' "
        "(a list), 'requested' (TFBN_CPU_ISA, None when unset) and 'warning' (why the request "
        "was not honoured, None when it was).");
  m.attr("cpu_built") = true;
#if TFBN_WITH_CUDA
  tfbn::RegisterCudaBindings(m);  // cuda_* entry points on device tensors
#else
  m.attr("cuda_built") = false;
#endif
}
