/* A stand-in for libcuda.so.1, so that tfbn's host side of the GPU path runs on a machine
 * without a GPU: tests/test_cuda_host_path.py builds it as libcuda.so.1 and puts it first
 * on LD_LIBRARY_PATH of a child process, where tfbn._core opens it with dlopen.
 *
 * It implements the driver entry points core/cuda/driver.cc uses, with one device and one
 * context, and checks what a real driver would refuse or what would go wrong on a GPU:
 *   - a module image must be a cubin (ELF) or PTX text, and every kernel looked up in it
 *     must be named there;
 *   - a launch must run with the stream's context current, with block and grid sizes and
 *     static shared memory in the limits of every supported GPU, and with as many
 *     arguments as the kernel has parameters (PTX images say how many);
 *   - device memory is host memory here (malloc), and every allocation must be freed.
 * Kernels do not run: their launches are recorded (fake_cuda_* functions, read with
 * ctypes). FAKE_CUDA_CC sets the compute capability (default 90: sm_90; 100 gives a
 * device only the PTX image can serve).
 */
#define _GNU_SOURCE /* memmem */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUmodule;
typedef void* CUfunction;
typedef void* CUstream;

enum {
  kSuccess = 0,
  kInvalidValue = 1,
  kInvalidImage = 200,
  kInvalidContext = 201,
  kInvalidHandle = 400,
  kNotFound = 500,
};

/* A stream handle whose context is gone: cuStreamGetCtx fails for it. */
#define FAKE_DEAD_STREAM ((CUstream)(uintptr_t)0xdead)

static struct {
  int unused;
} the_context;
static unsigned long long context_id = 1;
static __thread CUcontext current = NULL;
static __thread CUcontext pushed[16];
static __thread int depth = 0;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int module_loads = 0, function_lookups = 0, allocations = 0;
static char last_error[512];
static char loaded_image[16] = "none";
static int image_kernels = 0;

#define MAX_KERNELS 4096
typedef struct {
  char name[512];
  int params; /* -1: unknown (a cubin) */
} Function;

typedef struct {
  int ptx;
  const char* data;
  size_t size;
  int kernel_count;
  Function kernels[MAX_KERNELS];
} Module;

#define MAX_LAUNCHES 100000
typedef struct {
  const Function* function;
  unsigned grid[3], block[3], shared;
  int args;
} Launch;
static Launch launches[MAX_LAUNCHES];
static int launch_count = 0;

static CUresult Refuse(CUresult code, const char* what, const char* detail) {
  pthread_mutex_lock(&lock);
  snprintf(last_error, sizeof last_error, "%s: %s", what, detail);
  pthread_mutex_unlock(&lock);
  return code;
}

static int ComputeCapability(void) {
  const char* cc = getenv("FAKE_CUDA_CC");
  return cc ? atoi(cc) : 90;
}

/* ---- what the tests read ---- */
int fake_cuda_module_loads(void) { return module_loads; }
int fake_cuda_function_lookups(void) { return function_lookups; }
int fake_cuda_allocations(void) { return allocations; }
int fake_cuda_launch_count(void) { return launch_count; }
const char* fake_cuda_last_error(void) { return last_error; }
/* The last image loaded: "sm_90" (a cubin, from its ELF flags) or "ptx". */
const char* fake_cuda_loaded_image(void) { return loaded_image; }
/* The kernels of the last PTX image loaded (0 for a cubin, whose kernels are not listed). */
int fake_cuda_image_kernels(void) { return image_kernels; }
/* "name|gx,gy,gz|bx,by,bz|shared|args|params" */
const char* fake_cuda_launch(int i) {
  static __thread char line[700];
  if (i < 0 || i >= launch_count) return "";
  const Launch* l = &launches[i];
  snprintf(line, sizeof line, "%s|%u,%u,%u|%u,%u,%u|%u|%d|%d", l->function->name, l->grid[0],
           l->grid[1], l->grid[2], l->block[0], l->block[1], l->block[2], l->shared, l->args,
           l->function->params);
  return line;
}
void fake_cuda_reset_log(void) {
  pthread_mutex_lock(&lock);
  launch_count = 0;
  last_error[0] = 0;
  pthread_mutex_unlock(&lock);
}
/* The context is destroyed and a new one gets the same handle (cuDevicePrimaryCtxReset). */
void fake_cuda_recreate_context(void) { ++context_id; }

/* ---- the driver API ---- */
CUresult cuInit(unsigned flags) { return flags == 0 ? kSuccess : kInvalidValue; }
CUresult cuDriverGetVersion(int* v) {
  *v = 12050;
  return kSuccess;
}
CUresult cuDeviceGetCount(int* n) {
  *n = 1;
  return kSuccess;
}
CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice device) {
  if (device != 0) return Refuse(kInvalidValue, "cuDeviceGetAttribute", "no such device");
  switch (attribute) {
    case 16: /* CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT */
      *value = 132;
      return kSuccess;
    case 75: /* ..._COMPUTE_CAPABILITY_MAJOR */
      *value = ComputeCapability() / 10;
      return kSuccess;
    case 76: /* ..._COMPUTE_CAPABILITY_MINOR */
      *value = ComputeCapability() % 10;
      return kSuccess;
  }
  return Refuse(kInvalidValue, "cuDeviceGetAttribute", "attribute not faked");
}
CUresult cuCtxGetCurrent(CUcontext* c) {
  *c = current;
  return kSuccess;
}
CUresult cuCtxPushCurrent_v2(CUcontext c) {
  if (c != (CUcontext)&the_context) return Refuse(kInvalidContext, "cuCtxPushCurrent", "bad");
  if (depth == 16) return Refuse(kInvalidValue, "cuCtxPushCurrent", "stack full");
  pushed[depth++] = current;
  current = c;
  return kSuccess;
}
CUresult cuCtxPopCurrent_v2(CUcontext* c) {
  if (depth == 0) return Refuse(kInvalidContext, "cuCtxPopCurrent", "nothing pushed");
  if (c) *c = current;
  current = pushed[--depth];
  return kSuccess;
}
CUresult cuCtxGetDevice(CUdevice* d) {
  if (current == NULL) return Refuse(kInvalidContext, "cuCtxGetDevice", "no current context");
  *d = 0;
  return kSuccess;
}
CUresult cuCtxGetId(CUcontext c, unsigned long long* id) {
  if (c != (CUcontext)&the_context) return Refuse(kInvalidContext, "cuCtxGetId", "bad context");
  *id = context_id;
  return kSuccess;
}
CUresult cuStreamGetCtx(CUstream s, CUcontext* c) {
  if (s == FAKE_DEAD_STREAM) return Refuse(kInvalidHandle, "cuStreamGetCtx", "dead stream");
  *c = (CUcontext)&the_context;
  return kSuccess;
}

/* The end of an ELF64 image: its section or program header table, whichever is last. */
static size_t ElfSize(const unsigned char* e) {
  uint64_t phoff, shoff;
  uint16_t phentsize, phnum, shentsize, shnum;
  memcpy(&phoff, e + 32, 8);
  memcpy(&shoff, e + 40, 8);
  memcpy(&phentsize, e + 54, 2);
  memcpy(&phnum, e + 56, 2);
  memcpy(&shentsize, e + 58, 2);
  memcpy(&shnum, e + 60, 2);
  const size_t a = phoff + (size_t)phentsize * phnum, b = shoff + (size_t)shentsize * shnum;
  return a > b ? a : b;
}

/* PTX: every ".entry name(" and the number of ".param"s up to its ")". */
static void ReadPtxEntries(Module* m) {
  const char* p = m->data;
  while ((p = strstr(p, ".entry ")) != NULL && m->kernel_count < MAX_KERNELS) {
    p += 7;
    const char* open = strchr(p, '(');
    const char* close = open ? strchr(open, ')') : NULL;
    if (!close) break;
    Function* f = &m->kernels[m->kernel_count++];
    size_t n = (size_t)(open - p);
    while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\n' || p[n - 1] == '\t')) --n;
    if (n >= sizeof f->name) n = sizeof f->name - 1;
    memcpy(f->name, p, n);
    f->name[n] = 0;
    f->params = 0;
    for (const char* q = open; (q = strstr(q, ".param")) != NULL && q < close; q += 6) ++f->params;
    p = close;
  }
}

CUresult cuModuleLoadData(CUmodule* module, const void* image) {
  if (current != (CUcontext)&the_context)
    return Refuse(kInvalidContext, "cuModuleLoadData", "not in the device's context");
  Module* m = calloc(1, sizeof(Module));
  m->data = image;
  if (memcmp(image, "\x7f" "ELF", 4) == 0) {
    m->size = ElfSize(image);
    uint32_t flags;
    memcpy(&flags, (const char*)image + 48, 4);
    snprintf(loaded_image, sizeof loaded_image, "sm_%u", flags & 0xff);
  } else if (strstr(image, ".version") != NULL && strstr(image, ".target") != NULL) {
    m->ptx = 1;
    m->size = strlen(image);
    snprintf(loaded_image, sizeof loaded_image, "ptx");
    ReadPtxEntries(m);
    image_kernels = m->kernel_count;
  } else {
    free(m);
    return Refuse(kInvalidImage, "cuModuleLoadData", "neither a cubin nor PTX");
  }
  __sync_fetch_and_add(&module_loads, 1);
  *module = m;
  return kSuccess;
}

CUresult cuModuleGetFunction(CUfunction* function, CUmodule module, const char* name) {
  Module* m = module;
  __sync_fetch_and_add(&function_lookups, 1);
  if (m->ptx) {
    for (int i = 0; i < m->kernel_count; ++i)
      if (strcmp(m->kernels[i].name, name) == 0) {
        *function = &m->kernels[i];
        return kSuccess;
      }
    return Refuse(kNotFound, "cuModuleGetFunction: not in the PTX", name);
  }
  /* a cubin names each kernel in its string table, NUL-terminated on both sides */
  const size_t n = strlen(name);
  const char* p = m->data;
  const char* end = m->data + m->size;
  int found = 0;
  while (p + n + 1 < end) {
    const char* hit = memmem(p, (size_t)(end - p), name, n);
    if (!hit) break;
    if (hit > m->data && hit[-1] == 0 && hit[n] == 0) {
      found = 1;
      break;
    }
    p = hit + 1;
  }
  if (!found) return Refuse(kNotFound, "cuModuleGetFunction: not in the cubin", name);
  pthread_mutex_lock(&lock);
  if (m->kernel_count == MAX_KERNELS) {
    pthread_mutex_unlock(&lock);
    return Refuse(kInvalidValue, "cuModuleGetFunction", "too many kernels");
  }
  Function* f = &m->kernels[m->kernel_count++];
  snprintf(f->name, sizeof f->name, "%s", name);
  f->params = -1;
  pthread_mutex_unlock(&lock);
  *function = f;
  return kSuccess;
}

CUresult cuLaunchKernel(CUfunction function, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared, CUstream stream, void** params,
                        void** extra) {
  const Function* f = function;
  (void)stream;
  if (current != (CUcontext)&the_context)
    return Refuse(kInvalidContext, "cuLaunchKernel: the stream's context is not current", f->name);
  if (extra != NULL) return Refuse(kInvalidValue, "cuLaunchKernel: extra is not used", f->name);
  const unsigned long long threads = (unsigned long long)bx * by * bz;
  if (threads == 0 || threads > 1024 || bz > 64)
    return Refuse(kInvalidValue, "cuLaunchKernel: block size", f->name);
  if (gx == 0 || gy == 0 || gz == 0 || gx > 0x7fffffffu || gy > 65535 || gz > 65535)
    return Refuse(kInvalidValue, "cuLaunchKernel: grid size", f->name);
  if (shared > 48 * 1024)
    return Refuse(kInvalidValue, "cuLaunchKernel: over 48 KiB of dynamic shared memory", f->name);
  if (params == NULL) return Refuse(kInvalidValue, "cuLaunchKernel: no arguments", f->name);
  int args = 0;
  while (args < 64 && params[args] != NULL) ++args;
  if (f->params >= 0 && args != f->params) {
    char detail[640];
    snprintf(detail, sizeof detail, "%s takes %d arguments, given %d", f->name, f->params, args);
    return Refuse(kInvalidValue, "cuLaunchKernel", detail);
  }
  pthread_mutex_lock(&lock);
  if (launch_count < MAX_LAUNCHES) {
    Launch* l = &launches[launch_count++];
    l->function = f;
    l->grid[0] = gx, l->grid[1] = gy, l->grid[2] = gz;
    l->block[0] = bx, l->block[1] = by, l->block[2] = bz;
    l->shared = shared;
    l->args = args;
  }
  pthread_mutex_unlock(&lock);
  return kSuccess;
}

CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, CUfunction f, int threads,
                                                     size_t shared) {
  (void)f, (void)shared;
  *blocks = threads > 0 ? 2048 / threads : 0;
  return kSuccess;
}

CUresult cuGetErrorString(CUresult result, const char** text) {
  *text = result == kSuccess ? "no error" : "fake driver error";
  return kSuccess;
}

CUresult cuPointerGetAttribute(void* data, int attribute, CUdeviceptr pointer) {
  if (pointer == 0) return Refuse(kInvalidValue, "cuPointerGetAttribute", "null pointer");
  if (attribute == 1) { /* CU_POINTER_ATTRIBUTE_CONTEXT */
    *(CUcontext*)data = (CUcontext)&the_context;
    return kSuccess;
  }
  if (attribute == 9) { /* CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL */
    *(int*)data = 0;
    return kSuccess;
  }
  return Refuse(kInvalidValue, "cuPointerGetAttribute", "attribute not faked");
}

static CUresult Allocate(CUdeviceptr* p, size_t bytes, const char* what) {
  if (current != (CUcontext)&the_context) return Refuse(kInvalidContext, what, "no context");
  *p = (CUdeviceptr)(uintptr_t)malloc(bytes ? bytes : 1);
  __sync_fetch_and_add(&allocations, 1);
  return kSuccess;
}
static CUresult Release(CUdeviceptr p, const char* what) {
  if (current != (CUcontext)&the_context) return Refuse(kInvalidContext, what, "no context");
  free((void*)(uintptr_t)p);
  __sync_fetch_and_sub(&allocations, 1);
  return kSuccess;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream s) {
  (void)s;
  return Allocate(p, bytes, "cuMemAllocAsync");
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
  (void)s;
  return Release(p, "cuMemFreeAsync");
}
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return Allocate(p, bytes, "cuMemAlloc"); }
CUresult cuMemFree_v2(CUdeviceptr p) { return Release(p, "cuMemFree"); }
CUresult cuStreamSynchronize(CUstream s) {
  (void)s;
  return kSuccess;
}
