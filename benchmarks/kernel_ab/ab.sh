#!/usr/bin/env bash
# Builds build/kernel_ab/ab, the AVX-512 kernel tables of a git revision (the base,
# default HEAD) against the working tree's in one binary, then runs it (ab.cc says how).
#   benchmarks/kernel_ab/ab.sh [--base REV] ELEMENTS DTYPES THREADS OPS C...
#   e.g. REPS=15 INNER=49 benchmarks/kernel_ab/ab.sh --base HEAD~1 3211264 fb 2 mMpq 2048
# The flags are those CMakeLists.txt gives the kernels (Release: -O3).
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
base=HEAD
if [ "${1:-}" = "--base" ]; then base=$2; shift 2; fi
rev=$(git -C "$root" rev-parse "$base")
out="$root/build/kernel_ab"
mkdir -p "$out"
cxx=${CXX:-g++}
flags="-O3 -DNDEBUG -std=c++17 -ffp-contract=off -Wno-psabi"
avx512="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c -mprefer-vector-width=512"
# The base's tables get other names, so both builds link into one program.
rename="-DAvx512CpuKernels=BaseAvx512CpuKernels -DAvx512Bf16CpuKernels=BaseAvx512Bf16CpuKernels"
if [ "$(cat "$out/base.rev" 2>/dev/null)" != "$rev" ]; then
  rm -rf "$out/base-src" && mkdir -p "$out/base-src"
  git -C "$root" archive "$rev" cc | tar -x -C "$out/base-src"
  $cxx $flags $avx512 $rename -I"$out/base-src/cc" \
    -c "$out/base-src/cc/core/cpu_kernels_avx512.cc" -o "$out/base_avx512.o" &
  $cxx $flags $avx512 -mavx512bf16 $rename -I"$out/base-src/cc" \
    -c "$out/base-src/cc/core/cpu_kernels_avx512_bf16.cc" -o "$out/base_avx512_bf16.o" &
  wait
  echo "$rev" > "$out/base.rev"
fi
# The working tree's side is rebuilt when its sources (cc/, ab.cc) change.
sources=$(cd "$root" && find cc benchmarks/kernel_ab/ab.cc -type f | sort | xargs cat | sha1sum)
if [ "$(cat "$out/new.sources" 2>/dev/null)" != "$sources $rev" ] || [ ! -x "$out/ab" ]; then
  $cxx $flags $avx512 -I"$root/cc" -c "$root/cc/core/cpu_kernels_avx512.cc" -o "$out/new_avx512.o" &
  $cxx $flags $avx512 -mavx512bf16 -I"$root/cc" \
    -c "$root/cc/core/cpu_kernels_avx512_bf16.cc" -o "$out/new_avx512_bf16.o" &
  $cxx $flags -I"$root/cc" -c "$root/benchmarks/kernel_ab/ab.cc" -o "$out/ab.o"
  wait
  $cxx "$out"/ab.o "$out"/base_avx512.o "$out"/base_avx512_bf16.o "$out"/new_avx512.o \
    "$out"/new_avx512_bf16.o -o "$out/ab" -pthread
  echo "$sources $rev" > "$out/new.sources"
fi
echo "base $(git -C "$root" rev-parse --short "$rev") / working tree; ratios: base time / new time" >&2
exec "$out/ab" "$@"
