// See xla_registration.h.
#include "tf/xla_registration.h"

#include "tensorflow/core/framework/kernel_def.pb.h"
#include "tensorflow/core/framework/node_def.pb.h"
#include "tensorflow/core/framework/node_def_util.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_def.pb.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tfbn {
namespace {

using tensorflow::DeviceType;

// Whether TensorFlow has built its XLA kernel table for `device`: its lowering of Identity,
// registered for every XLA device, is then a kernel.
bool XlaKernelTableBuilt(const char* device) {
  tensorflow::NodeDef probe;
  probe.set_name("tfbn_probe");
  probe.set_op("Identity");
  tensorflow::AddNodeAttr("T", tensorflow::DT_FLOAT, &probe);
  const tensorflow::KernelDef* def = nullptr;
  return tensorflow::FindKernelDef(DeviceType(device), probe, &def, nullptr).ok();
}

}  // namespace

LateXlaRegistration::LateXlaRegistration(const char* op,
                                         tensorflow::XlaOpRegistry::Factory create) {
  const tensorflow::OpDef* op_def = nullptr;
  if (!tensorflow::OpRegistry::Global()->LookUpOpDef(op, &op_def).ok()) return;
  for (const char* device : {tensorflow::DEVICE_CPU_XLA_JIT, tensorflow::DEVICE_GPU_XLA_JIT}) {
    if (!tensorflow::XlaOpRegistry::IsBackendRegistered(device) || !XlaKernelTableBuilt(device))
      continue;
    // What TensorFlow would have registered: the op on this device, for the types its
    // definition allows (the XLA devices support all of tfbn's).
    auto* kernel_def = new tensorflow::KernelDef;  // lives as long as the registration
    kernel_def->set_op(op);
    kernel_def->set_device_type(device);
    for (const auto& attr : op_def->attr()) {
      if (attr.type() != "type") continue;
      auto* constraint = kernel_def->add_constraint();
      constraint->set_name(attr.name());
      *constraint->mutable_allowed_values() = attr.allowed_values();
    }
    new tensorflow::kernel_factory::OpKernelRegistrar(kernel_def, "XlaJitOp", create);
  }
}

}  // namespace tfbn
