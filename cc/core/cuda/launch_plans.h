// Plans (host): the reduction partition, the workspace layout, load widths and grids, and
// the launchers of the generic reduction and elementwise kernels (reduce_kernels.cuh,
// apply_kernels.cuh) for an operator given by its device name, e.g.
// "tfbn::cuda::MomentsOp<float>". Every launcher here has a ForEach*Name companion that
// lists the kernels it may launch for that operator (kernel_names.h gathers them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>

#include "core/batch_norm.h"
#include "core/batch_norm_cuda.h"
#include "core/cuda/kernel_args.h"
#include "core/cuda/launch.h"

namespace tfbn {
namespace cuda {

using NameSink = std::function<void(const std::string&)>;

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The smallest power of two >= n, at most cap.
int Pow2AtLeast(int64_t n, int cap);
bool Aligned16(const void* p);
// A grid of at most `resident` blocks (when known, > 0), at least one.
int64_t GridOf(int64_t needed, int64_t resident);

// Elements per 16-byte vector: the group size of both layouts.
inline int VecOf(DType t) { return static_cast<int>(16 / ElementBytes(t)); }

// "tfbn::cuda::<templ><T>" for data type dtype, e.g. OpName("MomentsOp", kFloat).
std::string OpName(const char* templ, DType dtype);

// The reduction partition: a function of (layout, vector width) only.
struct ReducePlan {
  bool rows = false;   // inner == 1
  int tx = 1, ty = 1;  // rows: threads over channel groups x rows
  int tpc = kThreads;  // planes: threads per channel
  int64_t tiles = 1;   // rows: channel tiles of tx * kVec channels; planes: channel blocks
  int64_t nb = 0;      // blocks per channel (0: nothing to reduce)
  int64_t grid() const { return nb * tiles; }
};
ReducePlan MakeReducePlan(const Layout& layout, int vec, bool reduce);
// Grid x of the reduction and finalize kernels is at most INT_MAX blocks.
bool GridFits(const Layout& layout, const ReducePlan& plan);

constexpr size_t kWorkspaceAlign = 256;
inline size_t AlignUp(size_t n) {
  return (n + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

struct WorkspacePlan {
  size_t partial_bytes = 0;  // [nb][2][C] doubles
  size_t coef_bytes = 0;     // [rows][C] U
  size_t total() const { return partial_bytes + coef_bytes; }
};
WorkspacePlan MakeWorkspacePlan(const Layout& layout, const ReducePlan& plan, size_t param_bytes,
                                int coef_rows);

// Finalize kernels: FX channels x FY partial rows per block. Few channels get narrow
// blocks, so that more blocks (and rows of threads) share the merge of up to kMaxBlocks
// partial rows, which is a chain of dependent loads per thread.
Dim3 FinalizeBlock(int64_t C);
inline Dim3 FinalizeGrid(int64_t C) {
  return {static_cast<unsigned>(CeilDiv(C, FinalizeBlock(C).x)), 1, 1};
}

// The widest load (elements: a power of two up to the vector) that keeps each load of a
// group inside one row (period C) or plane (period inner) and aligned for every pointer.
int LoadWidth(DType dtype, int64_t period, std::initializer_list<const void*> pointers);

// The two-sum reduction of operator `op` (inputs: 1 or 2) into partial [nb][2][C]; width:
// LoadWidth of the inputs (rows: whole vectors or single elements).
Result LaunchReduce(const std::string& op, DType dtype, const ReduceArgs& args,
                    const Layout& layout, const ReducePlan& plan, int width, double* partial,
                    Stream stream);
void ForEachReduceName(const std::string& op, DType dtype, const NameSink& sink);

// Elementwise pass of operator `op` (inputs: 1 or 2; coef its coefficient table):
// vectorized rows or planes when the layout and pointers allow it, otherwise one element
// per thread step (same results: vectors only change the loads).
Result LaunchApply(const std::string& op, int inputs, DType dtype, const void* a, const void* b,
                   const void* coef, void* out, const Layout& layout, Stream stream);
void ForEachApplyName(const std::string& op, DType dtype, const NameSink& sink);

// The four data types, for the ForEach*Name functions.
constexpr DType kAllDTypes[] = {DType::kHalf, DType::kBFloat16, DType::kFloat, DType::kDouble};

}  // namespace cuda
}  // namespace tfbn
