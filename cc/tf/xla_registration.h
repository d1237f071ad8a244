// Registration of the tfbn XLA lowerings that also works when the library is loaded after
// TensorFlow's first XLA compilation.
//
// REGISTER_XLA_OP only records a lowering; TensorFlow turns the records into kernels of
// the XLA devices (CPU_XLA_JIT, GPU_XLA_JIT) once, at its first XLA compilation, and a
// lowering recorded after that never becomes one. TFBN_REGISTER_XLA_OP records it the same
// way and, where that table was already built when the library loads, registers the kernel
// with TensorFlow's kernel registry itself.
#pragma once

#include "tensorflow/compiler/tf2xla/xla_op_registry.h"

namespace tfbn {

class LateXlaRegistration {
 public:
  LateXlaRegistration(const char* op, tensorflow::XlaOpRegistry::Factory create);
};

}  // namespace tfbn

#define TFBN_REGISTER_XLA_OP(OP, CLASS)                                            \
  REGISTER_XLA_OP(Name(OP), CLASS);                                                \
  static ::tfbn::LateXlaRegistration tfbn_late_xla_registration_##CLASS(           \
      OP, [](::tensorflow::OpKernelConstruction* ctx) -> ::tensorflow::OpKernel* { \
        return new CLASS(ctx);                                                     \
      })
