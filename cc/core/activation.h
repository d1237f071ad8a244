// The activations of the fused epilogue y = act(BN(x) + residual): the one table of their
// names and codes. The op attribute, the Python module, the XLA lowerings and the kernels
// all read it, so a new activation is added here and nowhere else by name.
#pragma once

#if !defined(__CUDACC_RTC__)  // the device code needs the enum only
#include <cstring>
#endif

namespace tfbn {

enum class Activation : int { kIdentity = 0, kRelu = 1, kRelu6 = 2, kSilu = 3 };
constexpr int kNumActivations = 4;

// Canonical names, indexed by the enum's value (the op attribute takes these).
constexpr const char* kActivationNames[kNumActivations] = {"identity", "relu", "relu6", "silu"};

// Keras' other spellings of the same functions.
struct ActivationAlias {
  const char* name;
  Activation activation;
};
constexpr ActivationAlias kActivationAliases[] = {{"linear", Activation::kIdentity},
                                                  {"swish", Activation::kSilu}};

#if !defined(__CUDACC_RTC__)  // host functions
// Looks up a canonical name or an alias; false where the name is none of them.
inline bool LookupActivation(const char* name, bool allow_aliases, Activation* activation) {
  for (int i = 0; i < kNumActivations; ++i)
    if (std::strcmp(name, kActivationNames[i]) == 0) {
      *activation = static_cast<Activation>(i);
      return true;
    }
  if (allow_aliases)
    for (const ActivationAlias& alias : kActivationAliases)
      if (std::strcmp(name, alias.name) == 0) {
        *activation = alias.activation;
        return true;
      }
  return false;
}

inline const char* ActivationName(Activation activation) {
  return kActivationNames[static_cast<int>(activation)];
}
#endif

}  // namespace tfbn
