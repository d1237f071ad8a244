// What every kernel of a tfbn op reads when it is built, on CPU, GPU and XLA alike, and
// the shape functions too: the op's attributes, checked; and, for kernels, the check that
// the op lists the inputs and outputs that op_signatures.h names.
#pragma once

#include <iterator>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/activation.h"
#include "core/batch_norm.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_def.pb.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tf/op_signatures.h"
#include "tf/validation.h"

namespace tfbn {

inline absl::Status ParseActivation(const std::string& name, Activation* activation) {
  if (LookupActivation(name.c_str(), /*allow_aliases=*/false, activation)) return absl::OkStatus();
  std::string names;
  for (const char* known : kActivationNames)
    absl::StrAppend(&names, names.empty() ? "" : ", ", known);
  return absl::InvalidArgumentError(
      absl::StrCat("tfbn: activation must be one of ", names, ", got activation = ", name));
}

inline bool HasAttr(const tensorflow::OpKernelConstruction* ctx, const char* name) {
  return ctx->HasAttr(name);
}
inline bool HasAttr(const tensorflow::shape_inference::InferenceContext* ctx, const char* name) {
  return ctx->GetAttr(name) != nullptr;
}

// Reads the attributes the op has, from a kernel's construction or a shape function's
// context.
template <typename Context>
absl::Status ReadOpAttrs(Context* ctx, OpAttrs* attrs) {
  auto read = [ctx](const char* name, auto* value) {
    return HasAttr(ctx, name) ? ctx->GetAttr(name, value) : absl::OkStatus();
  };
  TF_RETURN_IF_ERROR(read("axis", &attrs->axis));
  if (HasAttr(ctx, "epsilon")) {
    TF_RETURN_IF_ERROR(ctx->GetAttr("epsilon", &attrs->args.epsilon));
    TF_RETURN_IF_ERROR(CheckEpsilon(attrs->args.epsilon));
  }
  if (HasAttr(ctx, "T") && HasAttr(ctx, "U")) {
    tensorflow::DataType t, u;
    TF_RETURN_IF_ERROR(ctx->GetAttr("T", &t));
    TF_RETURN_IF_ERROR(ctx->GetAttr("U", &u));
    TF_RETURN_IF_ERROR(CheckParamDtype(t, u));
  }
  TF_RETURN_IF_ERROR(read("is_training", &attrs->args.training));
  TF_RETURN_IF_ERROR(read("has_scale", &attrs->has_scale));
  TF_RETURN_IF_ERROR(read("has_offset", &attrs->has_offset));
  TF_RETURN_IF_ERROR(read("has_residual", &attrs->has_residual));
  if (HasAttr(ctx, "activation")) {
    std::string activation;
    TF_RETURN_IF_ERROR(ctx->GetAttr("activation", &activation));
    TF_RETURN_IF_ERROR(ParseActivation(activation, &attrs->args.activation));
  }
  return absl::OkStatus();
}

// The op this kernel runs lists Io's inputs and outputs in Io's order (a kernel indexes
// them by Io's enums).
template <typename Io>
absl::Status CheckSignature(tensorflow::OpKernelConstruction* ctx) {
  const tensorflow::OpDef* def = nullptr;
  TF_RETURN_IF_ERROR(tensorflow::OpRegistry::Global()->LookUpOpDef(ctx->def().op(), &def));
  auto same = [](const auto& args, const auto& names) {
    if (args.size() != static_cast<int>(std::size(names))) return false;
    for (int i = 0; i < args.size(); ++i)
      if (args[i].name() != names[i]) return false;
    return true;
  };
  if (same(def->input_arg(), Io::kInputs) && same(def->output_arg(), Io::kOutputs))
    return absl::OkStatus();
  return absl::InternalError(absl::StrCat("tfbn: the kernel of ", def->name(),
                                          " expects other inputs or outputs than the op "
                                          "lists: op_signatures.h and the op disagree"));
}

// A kernel base, Base = tensorflow::OpKernel or XlaOpKernel, for op Io: checks the op's
// signature and reads its attributes when it is built.
template <typename Base, typename Io>
class WithOpAttrs : public Base {
 public:
  using In = Io;
  using Input = typename Io::Input;

  explicit WithOpAttrs(tensorflow::OpKernelConstruction* ctx) : Base(ctx) {
    OP_REQUIRES_OK(ctx, CheckSignature<Io>(ctx));
    OP_REQUIRES_OK(ctx, ReadOpAttrs(ctx, &attrs_));
  }

 protected:
  OpAttrs attrs_;
};

}  // namespace tfbn
