# CUDA kernels of tfbn, compiled by NVRTC at build time (no nvcc, no CUDA runtime):
#   TFBN_CUDA       ON (default) | OFF
#   TFBN_CUDA_ARCHS the images: SASS per sm_XX, PTX per compute_XX
#   TFBN_CUDA_ZLIB  ON (default) | OFF: embed the images zlib-compressed where zlib (zlib.h and
#                   libz) is found: 13 MB instead of 69 MB per library for the release list
# NVRTC and the CUDA headers come from the pinned PyPI wheels (requirements.txt):
# nvidia-cuda-nvrtc-cu12 (libnvrtc.so.12), nvidia-cuda-runtime-cu12 (cuda_fp16.h, cuda_bf16.h,
# and cuda.h for the driver API's types) and nvidia-cuda-cccl-cu12 (libcu++'s <cuda/std/...>,
# the standard headers device code may use under NVRTC). TFBN_NVIDIA_ROOT names the folder
# holding their `nvidia/` package when the Python building tfbn cannot import it.
# Defines
#   tfbn_cuda  STATIC  the launchers (host code, driver API via dlopen) and the images
# and sets TFBN_CUDA_ENABLED (True/False, for build_info), TFBN_CUDA_ARCHITECTURES,
# TFBN_CUDA_VERSION (NVRTC's, e.g. 12.5) and TFBN_CUDA_IMAGE_COMPRESSION (zlib or none).
# Uses TFBN_ABI_DEFINITIONS (TensorFlow's -D flags).

set(TFBN_CUDA ON CACHE STRING "Build the CUDA kernels (NVRTC): ON or OFF")
set_property(CACHE TFBN_CUDA PROPERTY STRINGS ON OFF)
# TensorFlow 2.21's list (sm_60, sm_70, sm_80, sm_89, compute_90) and the archs between.
set(TFBN_CUDA_ARCHS "sm_60;sm_70;sm_75;sm_80;sm_86;sm_89;sm_90;compute_90" CACHE STRING
    "CUDA images to build: sm_XX (SASS) and compute_XX (PTX)")
option(TFBN_CUDA_ZLIB "Embed the CUDA images zlib-compressed (where zlib is found)" ON)
set(TFBN_NVIDIA_ROOT "" CACHE PATH "Folder holding the nvidia/ package of the NVRTC wheels")

set(TFBN_CUDA_ENABLED False)
set(TFBN_CUDA_ARCHITECTURES "")
set(TFBN_CUDA_VERSION "")
set(TFBN_CUDA_IMAGE_COMPRESSION "")
string(TOUPPER "${TFBN_CUDA}" _tfbn_cuda_mode)
if(_tfbn_cuda_mode STREQUAL "OFF")
  message(STATUS "tfbn: CUDA kernels off (TFBN_CUDA=OFF)")
  return()
endif()
if(_tfbn_cuda_mode STREQUAL "AUTO")  # the spelling of builds before NVRTC: the same as ON
  set(_tfbn_cuda_mode ON)
endif()
if(NOT _tfbn_cuda_mode STREQUAL "ON")
  message(FATAL_ERROR "TFBN_CUDA must be ON or OFF, got '${TFBN_CUDA}'")
endif()

if(NOT TFBN_NVIDIA_ROOT)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
            "import os, nvidia.cuda_nvrtc as m; print(os.path.dirname(os.path.dirname(os.path.dirname(m.__file__))))"
    OUTPUT_VARIABLE TFBN_NVIDIA_ROOT OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _found)
  if(NOT _found EQUAL 0)
    message(FATAL_ERROR "tfbn: the NVRTC wheel is not installed for ${Python_EXECUTABLE}: "
                        "pip install -r requirements.txt (nvidia-cuda-nvrtc-cu12, "
                        "nvidia-cuda-runtime-cu12, nvidia-cuda-cccl-cu12), set TFBN_NVIDIA_ROOT, "
                        "or configure with -DTFBN_CUDA=OFF.")
  endif()
endif()
set(_nv "${TFBN_NVIDIA_ROOT}/nvidia")
set(TFBN_NVRTC_LIBRARY "${_nv}/cuda_nvrtc/lib/libnvrtc.so.12")
set(TFBN_CUDA_INCLUDE_DIR "${_nv}/cuda_runtime/include")
set(TFBN_CCCL_INCLUDE_DIR "${_nv}/cuda_cccl/include")
foreach(_need "${TFBN_NVRTC_LIBRARY}" "${TFBN_CUDA_INCLUDE_DIR}/cuda_fp16.h"
              "${TFBN_CUDA_INCLUDE_DIR}/cuda.h" "${TFBN_CCCL_INCLUDE_DIR}/cuda/std/cstdint")
  if(NOT EXISTS "${_need}")
    message(FATAL_ERROR "tfbn: ${_need} is missing (TFBN_NVIDIA_ROOT=${TFBN_NVIDIA_ROOT}); "
                        "install requirements.txt or configure with -DTFBN_CUDA=OFF.")
  endif()
endforeach()

foreach(_arch IN LISTS TFBN_CUDA_ARCHS)
  if(NOT _arch MATCHES "^(sm|compute)_[0-9]+$")
    message(FATAL_ERROR "tfbn: TFBN_CUDA_ARCHS takes sm_XX and compute_XX entries, got "
                        "'${_arch}' (in '${TFBN_CUDA_ARCHS}')")
  endif()
endforeach()

# Compressed images need zlib at build and run time (libz.so.1, which a process running
# TensorFlow has loaded already); without it they are embedded as they are.
set(TFBN_CUDA_IMAGE_COMPRESSION none)
set(_tfbn_zlib "")
set(_tfbn_compress "")
if(TFBN_CUDA_ZLIB)
  find_package(ZLIB)
  if(ZLIB_FOUND)
    set(TFBN_CUDA_IMAGE_COMPRESSION zlib)
    set(_tfbn_zlib ZLIB::ZLIB)
    set(_tfbn_compress --compress)
  else()
    message(STATUS "tfbn: zlib not found (zlib1g-dev): the CUDA images are embedded "
                   "uncompressed, about 5x larger")
  endif()
endif()

# The launchers: host code, no CUDA library linked (cuda.h for the driver's types only).
set(_tfbn_cuda_host_sources
    cc/core/cuda/driver.cc cc/core/cuda/image_bytes.cc cc/core/cuda/launch_plans.cc
    cc/core/batch_norm_cuda.cc cc/core/batch_norm_cuda_split.cc
    cc/core/batch_norm_cuda_epilogue.cc)
add_library(tfbn_cuda_host OBJECT ${_tfbn_cuda_host_sources})
if(_tfbn_zlib)
  target_compile_definitions(tfbn_cuda_host PRIVATE TFBN_CUDA_ZLIB=1)
  target_link_libraries(tfbn_cuda_host PRIVATE ${_tfbn_zlib})  # its include directory
endif()
target_include_directories(tfbn_cuda_host PUBLIC "${CMAKE_CURRENT_SOURCE_DIR}/cc")
target_include_directories(tfbn_cuda_host SYSTEM PRIVATE "${TFBN_CUDA_INCLUDE_DIR}")
target_compile_definitions(tfbn_cuda_host PRIVATE ${TFBN_ABI_DEFINITIONS})
target_compile_options(tfbn_cuda_host PRIVATE -Wall -Wextra)

# The list of kernels to compile, from the launchers themselves.
add_executable(tfbn_kernel_names cc/core/cuda/print_kernel_names.cc cc/core/cuda/no_images.cc
                                 $<TARGET_OBJECTS:tfbn_cuda_host>)
target_include_directories(tfbn_kernel_names PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/cc")
target_compile_definitions(tfbn_kernel_names PRIVATE ${TFBN_ABI_DEFINITIONS})
target_link_libraries(tfbn_kernel_names PRIVATE ${CMAKE_DL_LIBS} ${_tfbn_zlib})
set(_gen "${CMAKE_CURRENT_BINARY_DIR}/cuda")
# The list is a byproduct (restat): a rebuilt launcher that names the same kernels does not
# make NVRTC run again.
add_custom_command(
  OUTPUT "${_gen}/kernel_names.stamp"
  BYPRODUCTS "${_gen}/kernel_names.txt"
  COMMAND "${CMAKE_COMMAND}" -E make_directory "${_gen}"
  COMMAND tfbn_kernel_names "${_gen}/kernel_names.txt"
  COMMAND "${CMAKE_COMMAND}" -E touch "${_gen}/kernel_names.stamp"
  DEPENDS tfbn_kernel_names
  VERBATIM)

file(GLOB _tfbn_device_headers "${CMAKE_CURRENT_SOURCE_DIR}/cc/core/cuda/*.cuh")
string(REPLACE ";" "," _archs "${TFBN_CUDA_ARCHS}")
add_custom_command(
  OUTPUT "${_gen}/cuda_images.S" "${_gen}/cuda_images.cc"
  COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_SOURCE_DIR}/cmake/nvrtc_compile.py"
          --nvrtc "${TFBN_NVRTC_LIBRARY}"
          --source "${CMAKE_CURRENT_SOURCE_DIR}/cc/core/cuda/kernels.cu"
          --names "${_gen}/kernel_names.txt" --archs "${_archs}"
          --include "${CMAKE_CURRENT_SOURCE_DIR}/cc" --include "${TFBN_CUDA_INCLUDE_DIR}"
          --include "${TFBN_CCCL_INCLUDE_DIR}" --out-dir "${_gen}"
          ${_tfbn_compress}
  DEPENDS "${_gen}/kernel_names.stamp" "${_gen}/kernel_names.txt"
          "${CMAKE_CURRENT_SOURCE_DIR}/cmake/nvrtc_compile.py"
          "${CMAKE_CURRENT_SOURCE_DIR}/cc/core/cuda/kernels.cu" ${_tfbn_device_headers}
          "${CMAKE_CURRENT_SOURCE_DIR}/cc/core/cuda/kernel_args.h"
          "${CMAKE_CURRENT_SOURCE_DIR}/cc/core/batch_norm_math.h"
          "${CMAKE_CURRENT_SOURCE_DIR}/cc/core/activation_math.h"
          "${CMAKE_CURRENT_SOURCE_DIR}/cc/core/activation.h"
          "${CMAKE_CURRENT_SOURCE_DIR}/cc/core/host_device.h"
  COMMENT "NVRTC: compiling the CUDA kernels for ${TFBN_CUDA_ARCHS}"
  VERBATIM)

enable_language(ASM)
add_library(tfbn_cuda STATIC $<TARGET_OBJECTS:tfbn_cuda_host> "${_gen}/cuda_images.cc"
                             "${_gen}/cuda_images.S")
target_include_directories(tfbn_cuda PUBLIC "${CMAKE_CURRENT_SOURCE_DIR}/cc")
target_compile_definitions(tfbn_cuda PRIVATE ${TFBN_ABI_DEFINITIONS})
target_link_libraries(tfbn_cuda PUBLIC ${CMAKE_DL_LIBS} ${_tfbn_zlib})

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import ctypes; l = ctypes.CDLL('${TFBN_NVRTC_LIBRARY}'); a, b = ctypes.c_int(), ctypes.c_int(); l.nvrtcVersion(ctypes.byref(a), ctypes.byref(b)); print(f'{a.value}.{b.value}')"
  OUTPUT_VARIABLE TFBN_CUDA_VERSION OUTPUT_STRIP_TRAILING_WHITESPACE)
set(TFBN_CUDA_ENABLED True)
set(TFBN_CUDA_ARCHITECTURES "${TFBN_CUDA_ARCHS}")
message(STATUS "tfbn: CUDA kernels on (NVRTC ${TFBN_CUDA_VERSION} from ${_nv}, "
               "${TFBN_CUDA_ARCHS}; images compressed: ${TFBN_CUDA_IMAGE_COMPRESSION})")
