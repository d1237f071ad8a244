# Finds the installed TensorFlow through the Python interpreter (tf.sysconfig) and defines
# the INTERFACE target tensorflow::framework with its headers, flags and library.
# Stops with a clear message when TensorFlow is missing or the C++ ABI flags disagree.

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c [=[
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
print("TFBN_VERSION=" + tf.__version__)
print("TFBN_INCLUDE=" + tf.sysconfig.get_include())
print("TFBN_LIB=" + tf.sysconfig.get_lib())
print("TFBN_FLAGS=" + ",".join(tf.sysconfig.get_compile_flags()))
]=]
  OUTPUT_VARIABLE _tf_out
  ERROR_VARIABLE _tf_err
  RESULT_VARIABLE _tf_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _tf_rc EQUAL 0)
  message(FATAL_ERROR
    "tfbn needs TensorFlow installed in the Python that builds it (${Python_EXECUTABLE}), "
    "but `import tensorflow` failed:\n${_tf_err}\n"
    "Install it first (pip install tensorflow==2.21.*), then build with "
    "`pip install --no-build-isolation .`.")
endif()
# Read the tagged lines only: TensorFlow may log to stdout on import.
string(REGEX MATCH "TFBN_VERSION=([^\n]*)" _ "${_tf_out}")
set(TF_VERSION "${CMAKE_MATCH_1}")
string(REGEX MATCH "TFBN_INCLUDE=([^\n]*)" _ "${_tf_out}")
set(TF_INCLUDE_DIR "${CMAKE_MATCH_1}")
string(REGEX MATCH "TFBN_LIB=([^\n]*)" _ "${_tf_out}")
set(TF_LIB_DIR "${CMAKE_MATCH_1}")
string(REGEX MATCH "TFBN_FLAGS=([^\n]*)" _ "${_tf_out}")
set(_tf_flags "${CMAKE_MATCH_1}")
string(REPLACE "," ";" _tf_flags "${_tf_flags}")

set(TF_CXX11_ABI "")
set(TF_DEFINITIONS "")
foreach(_flag IN LISTS _tf_flags)
  if(_flag MATCHES "^-D_GLIBCXX_USE_CXX11_ABI=([01])$")
    set(TF_CXX11_ABI "${CMAKE_MATCH_1}")
  endif()
  if(_flag MATCHES "^-D(.+)$")
    list(APPEND TF_DEFINITIONS "${CMAKE_MATCH_1}")
  endif()
endforeach()
if(TF_CXX11_ABI STREQUAL "")
  message(FATAL_ERROR "TensorFlow ${TF_VERSION} did not report _GLIBCXX_USE_CXX11_ABI in "
                      "tf.sysconfig.get_compile_flags(): ${_tf_flags}")
endif()
if("${CMAKE_CXX_FLAGS}" MATCHES "_GLIBCXX_USE_CXX11_ABI=([01])" AND
   NOT CMAKE_MATCH_1 STREQUAL TF_CXX11_ABI)
  message(FATAL_ERROR
    "CMAKE_CXX_FLAGS sets _GLIBCXX_USE_CXX11_ABI=${CMAKE_MATCH_1}, but TensorFlow "
    "${TF_VERSION} was built with _GLIBCXX_USE_CXX11_ABI=${TF_CXX11_ABI}; the op library "
    "would not load. Remove the flag from CMAKE_CXX_FLAGS.")
endif()

find_library(TF_FRAMEWORK_LIBRARY NAMES libtensorflow_framework.so.2
             PATHS "${TF_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
message(STATUS "TensorFlow ${TF_VERSION}: ${TF_INCLUDE_DIR} (C++11 ABI ${TF_CXX11_ABI})")

# Flags every object must share with TensorFlow (ABI, Eigen alignment), core included.
add_library(tensorflow_flags INTERFACE)
target_compile_definitions(tensorflow_flags INTERFACE ${TF_DEFINITIONS})
target_include_directories(tensorflow_flags SYSTEM INTERFACE "${TF_INCLUDE_DIR}")
add_library(tensorflow::flags ALIAS tensorflow_flags)

add_library(tensorflow_framework INTERFACE)
target_link_libraries(tensorflow_framework INTERFACE tensorflow::flags "${TF_FRAMEWORK_LIBRARY}")
add_library(tensorflow::framework ALIAS tensorflow_framework)
