# CUDA kernels of tfbn: decides whether they are built (TFBN_CUDA = AUTO | ON | OFF) and
# defines
#   tfbn_cuda     STATIC  the core launchers (cc/core/batch_norm_cuda.cu), no TensorFlow
#   tfbn_cudart   INTERFACE  the static CUDA runtime and its system libraries; link it right
#                 after tfbn_cuda and BEFORE libtensorflow_framework.so.2, which exports
#                 TensorFlow's own __cuda* runtime stubs. Its symbols are kept local
#                 (--exclude-libs), so the kernels bind to this runtime and nothing outside
#                 sees it.
# and sets TFBN_CUDA_ENABLED (True/False, Python spelling for build_info),
# TFBN_CUDA_ARCHITECTURES (sm_XX / compute_XX list for build_info).
# Uses TFBN_ABI_DEFINITIONS (TensorFlow's -D flags) for nvcc when set.

set(TFBN_CUDA AUTO CACHE STRING "Build the CUDA kernels: AUTO (when nvcc is found), ON, OFF")
set_property(CACHE TFBN_CUDA PROPERTY STRINGS AUTO ON OFF)
# SASS for each architecture, plus compute_90 PTX for newer GPUs (JIT by the driver).
set(TFBN_CUDA_ARCHS "75-real;80-real;86-real;89-real;90" CACHE STRING
    "CUDA architectures (CMake CUDA_ARCHITECTURES syntax)")

set(TFBN_CUDA_ENABLED False)
set(TFBN_CUDA_ARCHITECTURES "")
string(TOUPPER "${TFBN_CUDA}" _tfbn_cuda_mode)
if(_tfbn_cuda_mode STREQUAL "OFF")
  message(STATUS "tfbn: CUDA kernels off (TFBN_CUDA=OFF)")
  return()
endif()
if(NOT _tfbn_cuda_mode MATCHES "^(AUTO|ON)$")
  message(FATAL_ERROR "TFBN_CUDA must be AUTO, ON or OFF, got '${TFBN_CUDA}'")
endif()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(_tfbn_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "TFBN_CUDA=ON but no CUDA compiler (nvcc) was found; put nvcc on "
                        "PATH or set CMAKE_CUDA_COMPILER, or configure with -DTFBN_CUDA=OFF.")
  endif()
  message(STATUS "tfbn: CUDA kernels off (TFBN_CUDA=AUTO and no nvcc found)")
  return()
endif()

set(CMAKE_CUDA_ARCHITECTURES "${TFBN_CUDA_ARCHS}")
set(CMAKE_CUDA_RUNTIME_LIBRARY None)  # linked explicitly (tfbn_cudart), in a known place
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
find_package(Threads REQUIRED)
if(NOT CUDA_cudart_static_LIBRARY)
  message(FATAL_ERROR "tfbn: nvcc ${CMAKE_CUDA_COMPILER_VERSION} found, but not the static "
                      "CUDA runtime (libcudart_static.a) of its toolkit; configure with "
                      "-DTFBN_CUDA=OFF to build without CUDA.")
endif()

add_library(tfbn_cuda STATIC cc/core/batch_norm_cuda.cu)
target_include_directories(tfbn_cuda PUBLIC "${CMAKE_CURRENT_SOURCE_DIR}/cc")
target_compile_definitions(tfbn_cuda PRIVATE ${TFBN_ABI_DEFINITIONS})
set_target_properties(tfbn_cuda PROPERTIES
  CUDA_ARCHITECTURES "${TFBN_CUDA_ARCHS}"
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  CUDA_RUNTIME_LIBRARY None
  POSITION_INDEPENDENT_CODE ON)
# --fmad=false: no multiply-add contraction, the CPU code's arithmetic (see the .cu).
# --threads=0: the per-architecture compilations of the one .cu run in parallel.
target_compile_options(tfbn_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:--fmad=false --threads=0 -Xcompiler=-Wall>)

add_library(tfbn_cudart INTERFACE)
target_link_libraries(tfbn_cudart INTERFACE
  "${CUDA_cudart_static_LIBRARY}" Threads::Threads ${CMAKE_DL_LIBS} rt)
target_link_options(tfbn_cudart INTERFACE "LINKER:--exclude-libs,libcudart_static.a")

set(TFBN_CUDA_ENABLED True)
foreach(_arch IN LISTS TFBN_CUDA_ARCHS)
  if(_arch MATCHES "^([0-9]+)-real$")
    list(APPEND TFBN_CUDA_ARCHITECTURES "sm_${CMAKE_MATCH_1}")
  elseif(_arch MATCHES "^([0-9]+)-virtual$")
    list(APPEND TFBN_CUDA_ARCHITECTURES "compute_${CMAKE_MATCH_1}")
  elseif(_arch MATCHES "^([0-9]+)$")
    list(APPEND TFBN_CUDA_ARCHITECTURES "sm_${CMAKE_MATCH_1}" "compute_${CMAKE_MATCH_1}")
  else()
    list(APPEND TFBN_CUDA_ARCHITECTURES "${_arch}")
  endif()
endforeach()
message(STATUS "tfbn: CUDA kernels on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
               "${TFBN_CUDA_ARCHITECTURES}, static runtime ${CUDA_cudart_static_LIBRARY})")
