# XLA lowerings of the tfbn ops (REGISTER_XLA_OP): decides whether they are built
# (TFBN_XLA = AUTO | ON | OFF) and defines
#   tfbn_xla   MODULE  _tfbn_xla.so, loaded by tfbn after the op library; it holds only the
#              lowerings, so an op library without them (or a failed load) leaves the ops
#              working outside XLA.
# and sets TFBN_XLA_ENABLED (True/False, Python spelling for build_info) and
# TFBN_XLA_REASON (why they are left out, "" when built).
#
# What the lowerings need, all found here (needs TensorFlow.cmake first):
#   - the XLA / tf2xla headers inside the TensorFlow wheel (include/xla,
#     include/tensorflow/compiler/tf2xla);
#   - libtensorflow_cc.so.2 of the wheel (XlaOpKernel, XlaBuilder live there);
#   - the highwayhash and farmhash headers, which those headers include but the wheel does
#     not ship (Debian/Ubuntu: libhighwayhash-dev, libfarmhash-dev; `make` installs them
#     where it can). TFBN_XLA_EXTRA_INCLUDE_DIRS adds search paths for them.

set(TFBN_XLA AUTO CACHE STRING "Build the XLA lowerings: AUTO (when their headers are found), ON, OFF")
set_property(CACHE TFBN_XLA PROPERTY STRINGS AUTO ON OFF)
set(TFBN_XLA_EXTRA_INCLUDE_DIRS "" CACHE STRING
    "Extra directories to search for the highwayhash/ and farmhash.h headers")

set(TFBN_XLA_ENABLED False)
set(TFBN_XLA_REASON "")
string(TOUPPER "${TFBN_XLA}" _tfbn_xla_mode)
if(NOT _tfbn_xla_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "TFBN_XLA must be AUTO, ON or OFF, got '${TFBN_XLA}'")
endif()
if(_tfbn_xla_mode STREQUAL "OFF")
  set(TFBN_XLA_REASON "built with TFBN_XLA=OFF")
  message(STATUS "tfbn: XLA lowerings off (TFBN_XLA=OFF)")
  return()
endif()

set(_tfbn_xla_missing "")
foreach(_header tensorflow/compiler/tf2xla/xla_op_kernel.h xla/hlo/builder/xla_builder.h)
  if(NOT EXISTS "${TF_INCLUDE_DIR}/${_header}")
    list(APPEND _tfbn_xla_missing "${_header} (not in TensorFlow's include dir ${TF_INCLUDE_DIR})")
  endif()
endforeach()
find_library(TF_CC_LIBRARY NAMES libtensorflow_cc.so.2 PATHS "${TF_LIB_DIR}" NO_DEFAULT_PATH)
if(NOT TF_CC_LIBRARY)
  list(APPEND _tfbn_xla_missing "libtensorflow_cc.so.2 (not in ${TF_LIB_DIR})")
endif()
find_path(TFBN_HIGHWAYHASH_INCLUDE_DIR highwayhash/arch_specific.h
          HINTS ${TFBN_XLA_EXTRA_INCLUDE_DIRS})
if(NOT EXISTS "${TFBN_HIGHWAYHASH_INCLUDE_DIR}/highwayhash/arch_specific.h")
  list(APPEND _tfbn_xla_missing "highwayhash headers (Debian/Ubuntu: apt-get install libhighwayhash-dev)")
endif()
find_path(TFBN_FARMHASH_INCLUDE_DIR farmhash.h HINTS ${TFBN_XLA_EXTRA_INCLUDE_DIRS})
if(NOT EXISTS "${TFBN_FARMHASH_INCLUDE_DIR}/farmhash.h")
  list(APPEND _tfbn_xla_missing "farmhash.h (Debian/Ubuntu: apt-get install libfarmhash-dev)")
endif()

if(_tfbn_xla_missing)
  list(JOIN _tfbn_xla_missing "; " _tfbn_xla_why)
  if(_tfbn_xla_mode STREQUAL "ON")
    message(FATAL_ERROR "TFBN_XLA=ON but the XLA lowerings cannot be built, missing: "
                        "${_tfbn_xla_why}. Install them, or configure with -DTFBN_XLA=OFF.")
  endif()
  set(TFBN_XLA_REASON "missing at build time: ${_tfbn_xla_why}")
  message(WARNING "tfbn: building WITHOUT the XLA lowerings (tfbn ops will not compile under "
                  "jit_compile=True), missing: ${_tfbn_xla_why}")
  return()
endif()

add_library(tfbn_xla MODULE cc/tf/xla_registration.cc cc/tf/xla_view.cc cc/tf/xla_batch_norm.cc
                            cc/tf/xla_batch_norm_grad.cc cc/tf/xla_split_forward.cc
                            cc/tf/xla_split_backward.cc)
set_target_properties(tfbn_xla PROPERTIES PREFIX "" OUTPUT_NAME "_tfbn_xla")
target_include_directories(tfbn_xla PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/cc")
target_include_directories(tfbn_xla SYSTEM PRIVATE "${TFBN_HIGHWAYHASH_INCLUDE_DIR}"
                                                   "${TFBN_FARMHASH_INCLUDE_DIR}")
target_compile_options(tfbn_xla PRIVATE -Wall)
target_link_libraries(tfbn_xla PRIVATE tensorflow::framework "${TF_CC_LIBRARY}")
set(TFBN_XLA_ENABLED True)
message(STATUS "tfbn: XLA lowerings on (${TF_CC_LIBRARY})")
