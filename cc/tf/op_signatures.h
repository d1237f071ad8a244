// Every tfbn op's inputs and outputs, by name, in the order REGISTER_OP lists them
// (ops.cc, split_ops.cc), the checks of its inputs against x and its outputs' shapes.
// Kernels, shape functions and XLA lowerings index with these enums, never with bare
// numbers, and run these checks (input_checks.h, shape_fns.h). Every kernel checks when
// it is built that its op lists the same names (CheckSignature in op_attrs.h), so the two
// cannot drift apart. The names also label the arguments in error messages.
#pragma once

#include <cstdint>
#include <vector>

#include "core/batch_norm.h"

namespace tfbn {

// The attributes of the tfbn ops; each op has some of them, the others keep these values.
struct OpAttrs {
  int axis = -1;
  ForwardArgs args;  // epsilon, is_training, activation
  bool has_scale = false;
  bool has_offset = false;
  bool has_residual = false;
};

// Rows of the gradient sums: sum dy and sum dy * (x - mean); the all-reduced global sums
// may carry two more, the gradients reaching the batch mean and variance outputs.
constexpr int64_t kGradSumRows = 2;
constexpr int64_t kGradSumRowsWithStats = 4;

// What an input must be, given x (and its channel count C).
struct InputCheck {
  enum Kind : int {
    kVector,         // a per-channel vector of length C
    kVectorOrEmpty,  // the same, or empty [0] (not given: 1, 0 or unused)
    kResidual,       // x's shape where has_residual, else empty [0]
    kSums,           // [kGradSumRows, C] float64
    kGlobalSums,     // [kGradSumRows or kGradSumRowsWithStats, C] float64
    kWeights,        // empty [0] or x's shape without the channel axis (weights.h)
  };
  int input;
  Kind kind;
};

// The shape of an output, given x (shape functions).
enum class OutputShape : int {
  kLikeX,           // x's shape
  kChannelVector,   // [C]
  kPartials,        // [kPartialRows, C]
  kSums,            // [kGradSumRows, C]
  kLikeXIfResidual  // x's shape where has_residual, else empty [0]
};

inline InputCheck::Kind VectorUnless(bool may_be_empty) {
  return may_be_empty ? InputCheck::kVectorOrEmpty : InputCheck::kVector;
}

// TfbnBatchNorm: the fused op, y = act(BN(x) * scale + offset + residual).
struct BatchNormIo {
  enum Input : int { kX, kScale, kOffset, kMean, kVariance, kResidual };
  enum Output : int { kY, kBatchMean, kBatchVariance, kMeanLo };
  static constexpr const char* kInputs[] = {"x", "scale", "offset", "mean", "variance", "residual"};
  static constexpr const char* kOutputs[] = {"y", "batch_mean", "batch_variance", "mean_lo"};
  static constexpr OutputShape kOutputShapes[] = {OutputShape::kLikeX, OutputShape::kChannelVector,
                                                  OutputShape::kChannelVector,
                                                  OutputShape::kChannelVector};
  static constexpr bool kHasDy = false;
  static std::vector<InputCheck> Checks(const OpAttrs& a) {
    const bool training = a.args.training;
    return {{kScale, VectorUnless(!a.has_scale)},
            {kOffset, VectorUnless(!a.has_offset)},
            {kMean, VectorUnless(training)},
            {kVariance, VectorUnless(training)},
            {kResidual, InputCheck::kResidual}};
  }
};

// TfbnBatchNormGrad: dy, then the forward's inputs in the forward's order with the mean's
// low part beside the statistics, then the gradients reaching the forward's statistics
// outputs.
struct BatchNormGradIo {
  enum Input : int {
    kDy,
    kX,
    kScale,
    kOffset,
    kMean,
    kVariance,
    kMeanLo,
    kResidual,
    kDBatchMean,
    kDBatchVariance
  };
  enum Output : int { kDx, kDScale, kDOffset, kDResidual };
  static constexpr const char* kInputs[] = {
      "dy",       "x",       "scale",    "offset",       "mean",
      "variance", "mean_lo", "residual", "d_batch_mean", "d_batch_variance"};
  static constexpr const char* kOutputs[] = {"dx", "dscale", "doffset", "dresidual"};
  static constexpr OutputShape kOutputShapes[] = {OutputShape::kLikeX, OutputShape::kChannelVector,
                                                  OutputShape::kChannelVector,
                                                  OutputShape::kLikeXIfResidual};
  static constexpr bool kHasDy = true;
  static std::vector<InputCheck> Checks(const OpAttrs&) {
    return {{kScale, InputCheck::kVectorOrEmpty},
            {kOffset, InputCheck::kVectorOrEmpty},
            {kMean, InputCheck::kVector},
            {kVariance, InputCheck::kVector},
            {kMeanLo, InputCheck::kVectorOrEmpty},
            {kResidual, InputCheck::kResidual},
            {kDBatchMean, InputCheck::kVectorOrEmpty},
            {kDBatchVariance, InputCheck::kVectorOrEmpty}};
  }
};

// The split op family: the fused op cut where synchronized BatchNorm needs a collective
// (statistics | merge | apply forward, gradient sums | gradient apply backward).

// TfbnBatchNormStats: partial statistics [kPartialRows, C] of this slice.
struct StatsIo {
  enum Input : int { kX, kWeights };
  enum Output : int { kPartial };
  static constexpr const char* kInputs[] = {"x", "weights"};
  static constexpr const char* kOutputs[] = {"partial"};
  static constexpr OutputShape kOutputShapes[] = {OutputShape::kPartials};
  static constexpr bool kHasDy = false;
  static std::vector<InputCheck> Checks(const OpAttrs&) {
    return {{kWeights, InputCheck::kWeights}};
  }
};

// TfbnBatchNormMergeStats: partials of every slice -> the batch's statistics (no x: its
// input is checked by CheckPartials).
struct MergeStatsIo {
  enum Input : int { kPartials };
  enum Output : int { kMean, kVariance, kMeanLo, kCount };
  static constexpr const char* kInputs[] = {"partials"};
  static constexpr const char* kOutputs[] = {"mean", "variance", "mean_lo", "count"};
};

// TfbnBatchNormApply: normalizes x with given statistics.
struct ApplyIo {
  enum Input : int { kX, kScale, kOffset, kMean, kVariance, kMeanLo };
  enum Output : int { kY };
  static constexpr const char* kInputs[] = {"x", "scale", "offset", "mean", "variance", "mean_lo"};
  static constexpr const char* kOutputs[] = {"y"};
  static constexpr OutputShape kOutputShapes[] = {OutputShape::kLikeX};
  static constexpr bool kHasDy = false;
  static std::vector<InputCheck> Checks(const OpAttrs&) {
    return {{kScale, InputCheck::kVectorOrEmpty},
            {kOffset, InputCheck::kVectorOrEmpty},
            {kMean, InputCheck::kVector},
            {kVariance, InputCheck::kVector},
            {kMeanLo, InputCheck::kVectorOrEmpty}};
  }
};

// TfbnBatchNormGradSums: the gradient sums [kGradSumRows, C] of this slice.
struct GradSumsIo {
  enum Input : int { kDy, kX, kMean, kMeanLo };
  enum Output : int { kSums };
  static constexpr const char* kInputs[] = {"dy", "x", "mean", "mean_lo"};
  static constexpr const char* kOutputs[] = {"sums"};
  static constexpr OutputShape kOutputShapes[] = {OutputShape::kSums};
  static constexpr bool kHasDy = true;
  static std::vector<InputCheck> Checks(const OpAttrs&) {
    return {{kMean, InputCheck::kVector}, {kMeanLo, InputCheck::kVectorOrEmpty}};
  }
};

// TfbnBatchNormGradApply: dx from the sums over the whole batch.
struct GradApplyIo {
  enum Input : int {
    kDy,
    kX,
    kScale,
    kMean,
    kVariance,
    kMeanLo,
    kLocalSums,
    kGlobalSums,
    kCount,
    kWeights
  };
  enum Output : int { kDx, kDScale, kDOffset };
  static constexpr const char* kInputs[] = {"dy",       "x",       "scale",      "mean",
                                            "variance", "mean_lo", "local_sums", "global_sums",
                                            "count",    "weights"};
  static constexpr const char* kOutputs[] = {"dx", "dscale", "doffset"};
  static constexpr OutputShape kOutputShapes[] = {OutputShape::kLikeX, OutputShape::kChannelVector,
                                                  OutputShape::kChannelVector};
  static constexpr bool kHasDy = true;
  static std::vector<InputCheck> Checks(const OpAttrs&) {
    return {{kScale, InputCheck::kVectorOrEmpty}, {kMean, InputCheck::kVector},
            {kVariance, InputCheck::kVector},     {kMeanLo, InputCheck::kVectorOrEmpty},
            {kLocalSums, InputCheck::kSums},      {kGlobalSums, InputCheck::kGlobalSums},
            {kCount, InputCheck::kVector},        {kWeights, InputCheck::kWeights}};
  }
};

}  // namespace tfbn
