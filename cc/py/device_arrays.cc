// Device tensors of any framework (device_arrays.h): DLPack, __cuda_array_interface__ or
// (data_ptr, shape, dtype) tuples.
#include "py/device_arrays.h"

#include <pybind11/stl.h>

#include <stdexcept>

#include "core/cuda/driver.h"

namespace tfbn {
namespace py_cuda {
namespace {

// DLPack 0.x ABI (dlpack.h), the part read here.
struct DLDevice {
  int32_t device_type;  // kDLCUDA = 2, kDLCUDAManaged = 13
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

bool CompactStrides(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides,
                    int64_t unit) {
  for (int64_t d : shape)
    if (d == 0) return true;  // no elements: any strides describe the layout (DLPack's vary)
  int64_t expect = unit;
  for (size_t d = shape.size(); d-- > 0;) {
    if (shape[d] != 1 && strides[d] != expect) return false;
    expect *= shape[d];
  }
  return true;
}

std::string TypestrName(const std::string& t, int64_t* itemsize) {
  if (t.size() < 3) return t;
  *itemsize = std::stoll(t.substr(2));
  const char kind = t[1];
  if (kind == 'f' && *itemsize == 2) return "float16";
  if (kind == 'f' && *itemsize == 4) return "float32";
  if (kind == 'f' && *itemsize == 8) return "float64";
  return t;
}

bool FromCudaArrayInterface(const py::handle& obj, const char* name, DeviceArray* out) {
  py::dict cai;
  try {
    if (!py::hasattr(obj, "__cuda_array_interface__")) return false;
    cai = obj.attr("__cuda_array_interface__");
  } catch (const py::error_already_set&) {
    return false;  // e.g. PyTorch bfloat16: try DLPack
  }
  int64_t itemsize = 0;
  const std::string dtype = TypestrName(cai["typestr"].cast<std::string>(), &itemsize);
  // A typestr NumPy has no name for (PyTorch gives bfloat16 as "<V2"): the DLPack
  // capsule, where there is one, says what the bytes are.
  if (dtype.rfind("float", 0) != 0 && py::hasattr(obj, "__dlpack__")) return false;
  const py::tuple data = cai["data"];
  out->data = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
  out->shape = cai["shape"].cast<std::vector<int64_t>>();
  out->dtype = dtype;
  out->itemsize = itemsize;
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    const auto strides = cai["strides"].cast<std::vector<int64_t>>();
    if (!CompactStrides(out->shape, strides, out->itemsize))
      Fail(std::string(name) + " must be C-contiguous");
  }
  return true;
}

bool FromDLPack(const py::handle& obj, const char* name, int64_t stream, DeviceArray* out) {
  if (!py::hasattr(obj, "__dlpack__")) return false;
  // The consumer's stream: the producer orders its pending work before it. DLPack spells
  // the legacy default stream 1 (0 is reserved).
  py::object capsule;
  try {
    capsule = obj.attr("__dlpack__")(py::arg("stream") = stream == 0 ? int64_t{1} : stream);
  } catch (const py::error_already_set&) {
    capsule = obj.attr("__dlpack__")();
  }
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (managed == nullptr) {
    PyErr_Clear();
    Fail(std::string(name) + ": __dlpack__ did not return a DLPack tensor");
  }
  const DLTensor& t = managed->dl_tensor;
  if (t.device.device_type != 2 && t.device.device_type != 13)
    Fail(std::string(name) + " must be a CUDA device tensor (DLPack device type " +
         std::to_string(t.device.device_type) + ")");
  out->keep_alive = capsule;
  out->data = static_cast<char*>(t.data) + t.byte_offset;
  out->shape.assign(t.shape, t.shape + t.ndim);
  out->itemsize = t.dtype.bits / 8;
  if (t.dtype.lanes != 1)
    out->dtype = "vector";
  else if (t.dtype.code == 2 && t.dtype.bits == 16)
    out->dtype = "float16";
  else if (t.dtype.code == 4 && t.dtype.bits == 16)
    out->dtype = "bfloat16";
  else if (t.dtype.code == 2 && t.dtype.bits == 32)
    out->dtype = "float32";
  else if (t.dtype.code == 2 && t.dtype.bits == 64)
    out->dtype = "float64";
  else
    out->dtype =
        "dlpack code " + std::to_string(t.dtype.code) + " bits " + std::to_string(t.dtype.bits);
  if (t.strides != nullptr &&
      !CompactStrides(out->shape, std::vector<int64_t>(t.strides, t.strides + t.ndim), 1))
    Fail(std::string(name) + " must be C-contiguous");
  return true;
}

}  // namespace

void Fail(const std::string& what) { throw std::invalid_argument("tfbn: " + what); }

int64_t ItemsizeOf(const std::string& dtype) {
  if (dtype == "float16" || dtype == "bfloat16") return 2;
  if (dtype == "float32") return 4;
  if (dtype == "float64") return 8;
  if (dtype == "uint8" || dtype == "int8") return 1;
  Fail("unknown dtype '" + dtype + "' in a (data_ptr, shape, dtype) tuple");
}

DeviceArray ToDeviceArray(const py::handle& obj, const char* name, int64_t stream) {
  DeviceArray a;
  if (py::isinstance<py::tuple>(obj) && py::len(obj) == 3) {
    const py::tuple t = py::reinterpret_borrow<py::tuple>(obj);
    a.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
    a.shape = t[1].cast<std::vector<int64_t>>();
    a.dtype = t[2].cast<std::string>();
    a.itemsize = ItemsizeOf(a.dtype);
    return a;
  }
  if (FromCudaArrayInterface(obj, name, &a) || FromDLPack(obj, name, stream, &a)) return a;
  Fail(std::string(name) +
       " must be a CUDA device tensor (__cuda_array_interface__ or __dlpack__) or a "
       "(data_ptr, shape, dtype) tuple, got " +
       py::str(py::type::of(obj)).cast<std::string>());
}

cuda::DType DTypeOf(const DeviceArray& a, const char* name) {
  if (a.dtype == "float16") return cuda::DType::kHalf;
  if (a.dtype == "bfloat16") return cuda::DType::kBFloat16;
  if (a.dtype == "float32") return cuda::DType::kFloat;
  if (a.dtype == "float64") return cuda::DType::kDouble;
  Fail(std::string(name) + " must be float16, bfloat16, float32 or float64, got " + a.dtype);
}

Layout ViewAs(const std::vector<int64_t>& shape, int axis) {
  const int rank = static_cast<int>(shape.size());
  if (rank < 2)
    Fail("x must have rank >= 2 (batch and channel dimensions), got rank " + std::to_string(rank));
  if (axis < -rank || axis >= rank)
    Fail("axis = " + std::to_string(axis) + " is out of range for x of rank " +
         std::to_string(rank));
  if (axis < 0) axis += rank;
  Layout layout{1, shape[axis], 1};
  for (int d = 0; d < axis; ++d) layout.outer *= shape[d];
  for (int d = axis + 1; d < rank; ++d) layout.inner *= shape[d];
  return layout;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// Data tensors (x, y, dy, dx): the dtype and shape of x.
void* DataLike(const py::handle& obj, const char* name, const DeviceArray& x, int64_t stream,
               std::vector<DeviceArray>* keep) {
  DeviceArray a = ToDeviceArray(obj, name, stream);
  if (a.dtype != x.dtype || a.shape != x.shape)
    Fail(std::string(name) + " must have the dtype and shape of x (" + x.dtype + " " +
         ShapeString(x.shape) + "), got " + a.dtype + " " + ShapeString(a.shape));
  keep->push_back(std::move(a));
  return keep->back().data;
}

// Per-channel tensors: vectors of length C of dtype U (float32, float64 for float64 x).
// None gives nullptr where allowed.
void* ChannelVector(const py::handle& obj, const char* name, cuda::DType dtype, int64_t C,
                    bool allow_none, int64_t stream, std::vector<DeviceArray>* keep) {
  if (obj.is_none()) {
    if (allow_none) return nullptr;
    Fail(std::string(name) + " is required");
  }
  DeviceArray a = ToDeviceArray(obj, name, stream);
  const std::string want = dtype == cuda::DType::kDouble ? "float64" : "float32";
  if (a.dtype != want || a.shape.size() != 1 || a.shape[0] != C)
    Fail(std::string(name) + " must be a " + want + " vector of length C = " + std::to_string(C) +
         ", got " + a.dtype + " " + ShapeString(a.shape));
  keep->push_back(std::move(a));
  return keep->back().data;
}

void Check(cuda::Result result, const char* what) {
  if (result != cuda::kSuccess)
    throw std::runtime_error(std::string("tfbn: ") + what + ": " + cuda::ErrorString(result));
}

// The context that owns the device memory at `data` (where the launch must run when the
// stream is a default stream, and where the workspace is allocated).
void* ContextOf(const void* data, const char* name) {
  void* context = nullptr;
  int device = -1;
  if (cuda::PointerContext(data, &context, &device) != cuda::kSuccess)
    Fail(std::string(name) + " is not CUDA device memory");
  return context;
}

cuda::Stream AsStream(int64_t stream) {
  return reinterpret_cast<cuda::Stream>(static_cast<uintptr_t>(stream));
}

void CheckEpsilon(float epsilon) {
  if (!(epsilon > 0.0f && epsilon <= 3.4e38f))
    Fail("epsilon must be positive and finite, got " + std::to_string(epsilon));
}

void* TensorOf(const py::handle& obj, const char* name, const std::string& dtype,
               const std::vector<int64_t>& shape, bool allow_none, int64_t stream,
               std::vector<DeviceArray>* keep) {
  if (obj.is_none()) {
    if (allow_none) return nullptr;
    Fail(std::string(name) + " is required");
  }
  DeviceArray a = ToDeviceArray(obj, name, stream);
  if (a.dtype != dtype || a.shape != shape)
    Fail(std::string(name) + " must be " + dtype + " " + ShapeString(shape) + ", got " + a.dtype +
         " " + ShapeString(a.shape));
  keep->push_back(std::move(a));
  return keep->back().data;
}

}  // namespace py_cuda
}  // namespace tfbn
