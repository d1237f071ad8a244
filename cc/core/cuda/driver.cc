// The driver-API path (driver.h, launch.h): dlopen'ed libcuda, one module of the embedded
// images per context, kernels looked up by name and launched in the stream's context.
#include "core/cuda/driver.h"

#include <cuda.h>  // types only: every entry point is looked up with dlsym
#include <dlfcn.h>

#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/cuda/images.h"
#include "core/cuda/launch.h"

namespace tfbn {
namespace cuda {
namespace {

// The detail of the last failure on this thread, appended to ErrorString's text.
thread_local std::string last_detail;

Result Fail(Result result, std::string detail) {
  last_detail = std::move(detail);
  return result;
}

struct Driver {
  bool ok = false;
  std::string why;  // why not ok
#define TFBN_DRIVER_FN(name) decltype(&::name) name = nullptr;
  TFBN_DRIVER_FN(cuInit)
  TFBN_DRIVER_FN(cuDriverGetVersion)
  TFBN_DRIVER_FN(cuDeviceGetCount)
  TFBN_DRIVER_FN(cuDeviceGetAttribute)
  TFBN_DRIVER_FN(cuCtxGetCurrent)
  TFBN_DRIVER_FN(cuCtxPushCurrent)
  TFBN_DRIVER_FN(cuCtxPopCurrent)
  TFBN_DRIVER_FN(cuCtxGetDevice)
  TFBN_DRIVER_FN(cuCtxGetId)
  TFBN_DRIVER_FN(cuStreamGetCtx)
  TFBN_DRIVER_FN(cuModuleLoadData)
  TFBN_DRIVER_FN(cuModuleGetFunction)
  TFBN_DRIVER_FN(cuLaunchKernel)
  TFBN_DRIVER_FN(cuOccupancyMaxActiveBlocksPerMultiprocessor)
  TFBN_DRIVER_FN(cuGetErrorString)
  TFBN_DRIVER_FN(cuPointerGetAttribute)
  TFBN_DRIVER_FN(cuMemAllocAsync)
  TFBN_DRIVER_FN(cuMemFreeAsync)
  TFBN_DRIVER_FN(cuMemAlloc)
  TFBN_DRIVER_FN(cuMemFree)
  TFBN_DRIVER_FN(cuStreamSynchronize)
#undef TFBN_DRIVER_FN

  Driver() {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      why = std::string("cannot open libcuda.so.1 (no NVIDIA driver): ") + dlerror();
      return;
    }
    // The exported names: cuda.h maps some API names onto versioned symbols.
    bool all = true;
    auto get = [&](auto& fn, const char* symbol) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, symbol));
      if (fn == nullptr && all) {
        all = false;
        why = std::string("libcuda.so.1 lacks ") + symbol + " (driver too old)";
      }
    };
    get(cuInit, "cuInit");
    get(cuDriverGetVersion, "cuDriverGetVersion");
    get(cuDeviceGetCount, "cuDeviceGetCount");
    get(cuDeviceGetAttribute, "cuDeviceGetAttribute");
    get(cuCtxGetCurrent, "cuCtxGetCurrent");
    get(cuCtxPushCurrent, "cuCtxPushCurrent_v2");
    get(cuCtxPopCurrent, "cuCtxPopCurrent_v2");
    get(cuCtxGetDevice, "cuCtxGetDevice");
    get(cuCtxGetId, "cuCtxGetId");
    get(cuStreamGetCtx, "cuStreamGetCtx");
    get(cuModuleLoadData, "cuModuleLoadData");
    get(cuModuleGetFunction, "cuModuleGetFunction");
    get(cuLaunchKernel, "cuLaunchKernel");
    get(cuOccupancyMaxActiveBlocksPerMultiprocessor, "cuOccupancyMaxActiveBlocksPerMultiprocessor");
    get(cuGetErrorString, "cuGetErrorString");
    get(cuPointerGetAttribute, "cuPointerGetAttribute");
    get(cuMemAllocAsync, "cuMemAllocAsync");
    get(cuMemFreeAsync, "cuMemFreeAsync");
    get(cuMemAlloc, "cuMemAlloc_v2");
    get(cuMemFree, "cuMemFree_v2");
    get(cuStreamSynchronize, "cuStreamSynchronize");
    if (!all) return;
    const CUresult init = cuInit(0);
    if (init != CUDA_SUCCESS) {
      why = "cuInit failed with CUresult " + std::to_string(init);
      return;
    }
    ok = true;
  }
};

const Driver& TheDriver() {
  static const Driver* driver = new Driver();  // never destroyed: kernels may run at exit
  return *driver;
}

// The driver, or nullptr where it cannot be used.
const Driver* Get() {
  const Driver& d = TheDriver();
  return d.ok ? &d : nullptr;
}

std::string DriverUnavailableReason() {
  const std::string& why = TheDriver().why;
  return why.empty() ? "the CUDA driver failed to initialize" : why;
}

// Makes `context` current for the scope (when it is not already).
class ContextScope {
 public:
  ContextScope(const Driver* d, CUcontext context) : d_(d) {
    CUcontext current = nullptr;
    d_->cuCtxGetCurrent(&current);
    if (current != context) pushed_ = d_->cuCtxPushCurrent(context) == CUDA_SUCCESS;
  }
  ~ContextScope() {
    if (pushed_) {
      CUcontext popped;
      d_->cuCtxPopCurrent(&popped);
    }
  }

 private:
  const Driver* d_;
  bool pushed_ = false;
};

Result StreamContext(const Driver* d, Stream stream, CUcontext* context) {
  const auto handle = reinterpret_cast<uintptr_t>(stream);
  // The default streams (legacy 0 or 0x1, per-thread 0x2) belong to the current context.
  if (handle <= 2) {
    if (d->cuCtxGetCurrent(context) != CUDA_SUCCESS || *context == nullptr)
      return Fail(CUDA_ERROR_INVALID_CONTEXT, "no CUDA context is current for the default stream");
    return kSuccess;
  }
  const Result r = d->cuStreamGetCtx(static_cast<CUstream>(stream), context);
  return r == kSuccess ? r : Fail(r, "cuStreamGetCtx: not a stream of a live context");
}

// A kernel's index in the embedded table, by name expression (-1: not in this build). The
// map is built once and only read after that.
int KernelIndex(const std::string& name) {
  static const auto* index = [] {
    auto* map = new std::unordered_map<std::string, int>();
    const ImageTable& table = EmbeddedImages();
    for (int i = 0; i < table.kernel_count; ++i) map->emplace(table.names[i], i);
    return map;
  }();
  const auto found = index->find(name);
  return found == index->end() ? -1 : found->second;
}

// The kernels of one context: its image, loaded at the first launch in the context with
// every function resolved at once. Later launches load nothing (they ask for the stream's
// context and its id, take the map's lock for a lookup, and read the function table): with
// CUDA's lazy loading, loading a kernel may synchronize the context, and a launch between
// two split ops could then wait on an all-reduce that waits on another device's next
// launch.
struct Module {
  explicit Module(unsigned long long id) : context_id(id) {}
  const unsigned long long context_id;  // cuCtxGetId: unique in the process, unlike a handle
  std::once_flag loaded;
  Result status = kSuccess;  // of loading (kept, so a failure is not retried per launch)
  std::string detail;
  int sms = 0;
  CUmodule module = nullptr;
  std::vector<CUfunction> functions;  // by kernel index
  std::mutex resident_mutex;
  std::unordered_map<std::string, int64_t> resident;  // "name/threads" -> blocks on the device
};

// Guards the map only; no driver call is made under it, so one context's loading never
// holds up a launch in another.
std::mutex modules_mutex;
std::map<CUcontext, Module*>& Modules() {
  static auto* modules = new std::map<CUcontext, Module*>();
  return *modules;
}

// The image for a device of compute capability major.minor: the SASS of the same major
// and the highest minor not above it, else PTX for an older architecture (compiled by
// the driver at load).
const KernelImage* PickImage(const ImageTable& table, int major, int minor) {
  const int sm = major * 10 + minor;
  const KernelImage* best = nullptr;
  for (int i = 0; i < table.image_count; ++i) {
    const KernelImage& image = table.images[i];
    if (!image.ptx && image.sm / 10 == major && image.sm <= sm && (!best || image.sm > best->sm))
      best = &image;
  }
  if (best) return best;
  for (int i = 0; i < table.image_count; ++i) {
    const KernelImage& image = table.images[i];
    if (image.ptx && image.sm <= sm && (!best || image.sm > best->sm)) best = &image;
  }
  return best;
}

void Load(const Driver* d, CUcontext context, Module* m) {
  ContextScope scope(d, context);
  CUdevice device;
  int major = 0, minor = 0;
  Result r = d->cuCtxGetDevice(&device);
  if (r == kSuccess)
    r = d->cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device);
  if (r == kSuccess)
    r = d->cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device);
  if (r == kSuccess)
    r = d->cuDeviceGetAttribute(&m->sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device);
  if (r != kSuccess) {
    m->status = r;
    m->detail = "could not query the device";
    return;
  }
  const ImageTable& table = EmbeddedImages();
  const KernelImage* image = PickImage(table, major, minor);
  if (image == nullptr) {
    m->status = kNoBinary;
    m->detail = "this build has kernels for " + std::string(table.architectures) +
                ", none of which runs on a GPU of compute capability " + std::to_string(major) +
                "." + std::to_string(minor);
    return;
  }
  std::vector<unsigned char> inflated;  // the driver copies the image: freed on return
  const unsigned char* bytes = ImageBytes(*image, &inflated, &m->detail);
  if (bytes == nullptr) {
    m->status = kNoBinary;
    return;
  }
  r = d->cuModuleLoadData(&m->module, bytes);
  if (r != kSuccess) {
    m->status = r;
    m->detail = std::string("loading the ") + image->arch + " kernels failed";
    return;
  }
  m->functions.resize(table.kernel_count);
  for (int i = 0; i < table.kernel_count; ++i) {
    r = d->cuModuleGetFunction(&m->functions[i], m->module, table.lowered[i]);
    if (r != kSuccess) {
      m->status = r;
      m->detail = std::string("cuModuleGetFunction(") + table.names[i] + ") in the " + image->arch +
                  " kernels";
      return;
    }
  }
}

// The context's module, loaded by the first thread to ask (the others wait for it).
Module* ModuleOf(const Driver* d, CUcontext context) {
  unsigned long long id = 0;
  d->cuCtxGetId(context, &id);
  Module* m;
  {
    std::lock_guard<std::mutex> lock(modules_mutex);
    Module*& slot = Modules()[context];
    // A destroyed context's handle can come back for a new one (cuDevicePrimaryCtxReset,
    // or cuCtxDestroy then cuCtxCreate), whose module is not loaded yet. The old entry is
    // left allocated: a thread may still hold it.
    if (slot == nullptr || slot->context_id != id) slot = new Module(id);
    m = slot;
  }
  std::call_once(m->loaded, Load, d, context, m);
  return m;
}

// Resolves the driver, the stream's context, its module and the function; on success the
// context and module are returned too.
Result Resolve(const Driver** d, Stream stream, const std::string& name, CUcontext* context,
               CUfunction* function, Module** module) {
  *d = Get();
  if (*d == nullptr) return Fail(kNoDriver, DriverUnavailableReason());
  Result r = StreamContext(*d, stream, context);
  if (r != kSuccess) return r;
  const int index = KernelIndex(name);
  if (index < 0) return Fail(kNoBinary, "kernel " + name + " is not in this build");
  Module* m = ModuleOf(*d, *context);
  if (m->status != kSuccess) return Fail(m->status, m->detail);
  *function = m->functions[index];
  if (module) *module = m;
  return kSuccess;
}

}  // namespace

Result LaunchKernel(const std::string& name, Dim3 grid, Dim3 block, size_t shared_bytes,
                    Stream stream, void** args) {
  last_detail.clear();  // a failure's detail is never carried over to a later one
  const Driver* d;
  CUcontext context;
  CUfunction function;
  const Result r = Resolve(&d, stream, name, &context, &function, nullptr);
  if (r != kSuccess) return r;
  ContextScope scope(d, context);
  const Result launched = d->cuLaunchKernel(function, grid.x, grid.y, grid.z, block.x, block.y,
                                            block.z, static_cast<unsigned>(shared_bytes),
                                            static_cast<CUstream>(stream), args, nullptr);
  if (launched != kSuccess) return Fail(launched, "launching " + name);
  return kSuccess;
}

int64_t ResidentBlocks(const std::string& name, int block_threads, Stream stream) {
  const Driver* d;
  CUcontext context;
  CUfunction function;
  Module* m;
  if (Resolve(&d, stream, name, &context, &function, &m) != kSuccess) return 0;
  const std::string key = name + "/" + std::to_string(block_threads);
  {
    std::lock_guard<std::mutex> lock(m->resident_mutex);
    const auto found = m->resident.find(key);
    if (found != m->resident.end()) return found->second;
  }
  int per_sm = 0;
  {
    ContextScope scope(d, context);
    if (d->cuOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, function, block_threads, 0) !=
        CUDA_SUCCESS)
      return 0;
  }
  const int64_t blocks = int64_t{m->sms} * (per_sm > 0 ? per_sm : 1);
  std::lock_guard<std::mutex> lock(m->resident_mutex);
  m->resident.emplace(key, blocks);
  return blocks;
}

std::string Instance(const std::string& templ, std::initializer_list<std::string> args) {
  std::string s = templ + "<";
  bool first = true;
  for (const std::string& a : args) {
    s += (first ? "" : ", ") + a;
    first = false;
  }
  return s + ">";
}

const char* DeviceTypeName(DType dtype) {
  switch (dtype) {
    case DType::kHalf:
      return "__half";
    case DType::kBFloat16:
      return "__nv_bfloat16";
    case DType::kFloat:
      return "float";
    case DType::kDouble:
      return "double";
  }
  return "?";
}

const char* ErrorString(Result result) {
  thread_local std::string text;
  const char* what = nullptr;
  if (const Driver* d = Get()) d->cuGetErrorString(static_cast<CUresult>(result), &what);
  if (what == nullptr) {
    switch (result) {
      case kSuccess:
        what = "no error";
        break;
      case kInvalidValue:
        what = "invalid argument";
        break;
      case kNoDriver:
        what = "no usable CUDA driver";
        break;
      case kNoBinary:
        what = "no kernel image for this GPU";
        break;
      case kNotSupported:
        what = "operation not supported";
        break;
      default:
        what = "CUDA error";
    }
  }
  text = std::string(what) + " (CUresult " + std::to_string(result) + ")";
  if (result != kSuccess && !last_detail.empty()) text += ": " + last_detail;
  last_detail.clear();  // told once: it must not reach a later, unrelated failure
  return text.c_str();
}

int CompilerVersion() { return EmbeddedImages().compiler_version; }
const char* Architectures() { return EmbeddedImages().architectures; }
const char* ImageCompression() { return EmbeddedImages().compression; }

std::string InflatedImage(const std::string& arch, std::string* error) {
  const ImageTable& table = EmbeddedImages();
  for (int i = 0; i < table.image_count; ++i) {
    const KernelImage& image = table.images[i];
    if (arch != image.arch) continue;
    std::vector<unsigned char> inflated;
    const unsigned char* bytes = ImageBytes(image, &inflated, error);
    if (bytes == nullptr) return {};
    const size_t size = image.inflated_size ? image.inflated_size : image.end - image.begin;
    return std::string(reinterpret_cast<const char*>(bytes), size);
  }
  *error = "no image for '" + arch + "' in this build (it has " + table.architectures + ")";
  return {};
}

int DriverVersion() {
  const Driver* d = Get();
  int v = 0;
  return d && d->cuDriverGetVersion(&v) == CUDA_SUCCESS ? v : 0;
}

int DeviceCount() {
  const Driver* d = Get();
  int n = 0;
  return d && d->cuDeviceGetCount(&n) == CUDA_SUCCESS ? n : 0;
}

Result PointerContext(const void* pointer, void** context, int* device) {
  const Driver* d = Get();
  if (d == nullptr) return Fail(kNoDriver, DriverUnavailableReason());
  const auto p = reinterpret_cast<CUdeviceptr>(pointer);
  CUcontext ctx = nullptr;
  Result r = d->cuPointerGetAttribute(&ctx, CU_POINTER_ATTRIBUTE_CONTEXT, p);
  int ordinal = -1;
  if (r == kSuccess) r = d->cuPointerGetAttribute(&ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, p);
  if (r != kSuccess) return Fail(r, "not CUDA device memory");
  *context = ctx;
  *device = ordinal;
  return kSuccess;
}

Result AllocateAsync(void* context, size_t bytes, Stream stream, void** pointer,
                     bool* synchronous) {
  const Driver* d = Get();
  if (d == nullptr) return Fail(kNoDriver, DriverUnavailableReason());
  ContextScope scope(d, static_cast<CUcontext>(context));
  CUdeviceptr p = 0;
  Result r = d->cuMemAllocAsync(&p, bytes, static_cast<CUstream>(stream));
  *synchronous = r == CUDA_ERROR_NOT_SUPPORTED;  // no stream-ordered allocator here
  if (*synchronous) r = d->cuMemAlloc(&p, bytes);
  *pointer = reinterpret_cast<void*>(p);
  return r;
}

Result FreeAsync(void* context, void* pointer, Stream stream, bool synchronous) {
  const Driver* d = Get();
  if (d == nullptr) return kNoDriver;
  ContextScope scope(d, static_cast<CUcontext>(context));
  const auto p = reinterpret_cast<CUdeviceptr>(pointer);
  if (!synchronous) return d->cuMemFreeAsync(p, static_cast<CUstream>(stream));
  const Result r = d->cuStreamSynchronize(static_cast<CUstream>(stream));
  const Result freed = d->cuMemFree(p);
  return r != kSuccess ? r : freed;
}

}  // namespace cuda
}  // namespace tfbn
