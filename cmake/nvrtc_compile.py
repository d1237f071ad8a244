"""Compiles tfbn's CUDA kernels with NVRTC at build time and writes them out for embedding.

NVRTC (libnvrtc.so.12 from the nvidia-cuda-nvrtc-cu12 wheel) compiles the one device
source for every architecture asked for: SASS (a cubin) for each sm_XX, PTX for each
compute_XX. Only the kernel instantiations named in the names file are compiled (NVRTC name
expressions); their lowered (mangled) names, the same for every architecture, are written
next to the names, so the host code can find each kernel in a loaded module.

Writes into --out-dir:
  <arch>.cubin / <arch>.ptx   the images
  <arch>.cubin.z / .ptx.z     with --compress: the same, zlib-compressed (what is embedded)
  cuda_images.S               the images, embedded with .incbin (hidden symbols)
  cuda_images.cc              the table core/cuda/images.h declares
  kernel_resources.tsv        ptxas' registers and spill bytes per kernel and SASS image
A failed compilation prints NVRTC's log and exits with status 1.
tests/test_cuda_spills.py uses compile_one and the options of this build.
"""

import argparse
import concurrent.futures
import ctypes
import os
import re
import sys
import time
import zlib

# ptxas -v: every SASS image reports each kernel's registers and spill bytes in the log.
VERBOSE_PTXAS = "--ptxas-options=-v"


def load_nvrtc(path):
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def check(lib, result, what):
    if result != 0:
        raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(result).decode()}")


def build_options(includes):
    """NVRTC options of tfbn's build (all but the architecture)."""
    return ["-std=c++17", "--fmad=false", "-DNDEBUG"] + [f"-I{d}" for d in includes]


def resource_usage(log, lowered):
    """{name: (registers, spill store bytes, spill load bytes)} from a ptxas -v log."""
    by_symbol = {symbol: name for name, symbol in lowered.items()}
    usage, current, spills = {}, None, (0, 0)
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)'", line)
        if entry:
            current, spills = by_symbol.get(entry.group(1)), (0, 0)
            continue
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill:
            spills = (int(spill.group(1)), int(spill.group(2)))
        registers = re.search(r"Used (\d+) registers", line)
        if registers and current is not None:
            usage[current] = (int(registers.group(1)),) + spills
    return usage


def compile_one(lib, source, source_name, arch, options, names):
    """Returns (image bytes, {name: lowered name}, seconds, {name: resource usage}); the
    usage is empty unless the options ask ptxas to report it (VERBOSE_PTXAS)."""
    start = time.monotonic()
    prog = ctypes.c_void_p()
    check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source, source_name.encode(), 0,
                                      None, None), "nvrtcCreateProgram")
    try:
        for name in names:
            check(lib, lib.nvrtcAddNameExpression(prog, name.encode()), f"name {name}")
        opts = [f"--gpu-architecture={arch}".encode()] + [o.encode() for o in options]
        result = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if result != 0:
            raise RuntimeError(f"NVRTC failed for {arch}:\n{log.value.decode(errors='replace')}")
        lowered = {}
        for name in names:
            out = ctypes.c_char_p()
            check(lib, lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)),
                  f"lowered name of {name}")
            lowered[name] = out.value.decode()
        ptx = arch.startswith("compute_")
        get_size, get = ((lib.nvrtcGetPTXSize, lib.nvrtcGetPTX) if ptx
                         else (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN))
        check(lib, get_size(prog, ctypes.byref(size)), "image size")
        image = ctypes.create_string_buffer(size.value)
        check(lib, get(prog, image), "image")
        data = image.raw[: size.value]
        if ptx:
            data = data.rstrip(b"\0")  # cuModuleLoadData wants PTX text ending in one NUL
        usage = resource_usage(log.value.decode(errors="replace"), lowered)
        return data, lowered, time.monotonic() - start, usage
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compress(data):
    """zlib at its best ratio: about 5x on these images (69 MB to 13 MB for the release list),
    and inflating one takes tens of milliseconds, once per device."""
    return zlib.compress(data, 9)


def write_outputs(out_dir, archs, blobs, names, lowered, version, compressed):
    asm = [".section .rodata.tfbn_cuda_images,\"a\",@progbits"]
    decls, rows = [], []
    stored = {}
    for i, arch in enumerate(archs):
        ext = "ptx" if arch.startswith("compute_") else "cubin"
        path = os.path.join(out_dir, f"{arch}.{ext}")
        with open(path, "wb") as f:
            f.write(blobs[arch])
        inflated_size = 0
        if compressed:
            path, inflated_size = path + ".z", len(blobs[arch])
            with open(path, "wb") as f:
                f.write(compressed[arch])
        stored[arch] = os.path.getsize(path)
        sym = f"tfbn_cuda_image_{i}"
        asm += [".balign 16", f".globl {sym}", f".hidden {sym}", f"{sym}:",
                f".incbin \"{os.path.abspath(path)}\"", f".globl {sym}_end", f".hidden {sym}_end",
                f"{sym}_end:"]
        decls.append(f"extern \"C\" const unsigned char {sym}[], {sym}_end[];")
        sm = int(arch.split("_")[1])
        rows.append(f"    {{\"{arch}\", {sm}, {str(ext == 'ptx').lower()}, {sym}, {sym}_end, "
                    f"{inflated_size}u}},")
    asm.append(".section .note.GNU-stack,\"\",@progbits")
    with open(os.path.join(out_dir, "cuda_images.S"), "w") as f:
        f.write("\n".join(asm) + "\n")
    quoted = lambda items: "\n".join(f"    \"{s}\"," for s in items)  # noqa: E731
    cc = f"""// Generated by cmake/nvrtc_compile.py: the kernel images (cuda_images.S) and names.
#include "core/cuda/images.h"

{chr(10).join(decls)}

namespace tfbn {{
namespace cuda {{
namespace {{
const KernelImage kImages[] = {{
{chr(10).join(rows)}
}};
const char* const kNames[] = {{
{quoted(names)}
}};
const char* const kLowered[] = {{
{quoted(lowered[n] for n in names)}
}};
}}  // namespace

const ImageTable& EmbeddedImages() {{
  static const ImageTable table{{kImages, {len(archs)}, kNames, kLowered, {len(names)}, {version},
                                \"{' '.join(archs)}\", \"{'zlib' if compressed else 'none'}\"}};
  return table;
}}

}}  // namespace cuda
}}  // namespace tfbn
"""
    with open(os.path.join(out_dir, "cuda_images.cc"), "w") as f:
        f.write(cc)
    return stored


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvrtc", required=True, help="path of libnvrtc.so.12")
    ap.add_argument("--source", required=True)
    ap.add_argument("--names", required=True, help="file with one name expression per line")
    ap.add_argument("--archs", required=True, help="e.g. sm_60;sm_70;compute_90")
    ap.add_argument("--include", action="append", default=[])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compress", action="store_true",
                    help="embed the images zlib-compressed (the library inflates them)")
    args = ap.parse_args()

    lib = load_nvrtc(args.nvrtc)
    major, minor = ctypes.c_int(), ctypes.c_int()
    check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    version = major.value * 1000 + minor.value * 10
    with open(args.source, "rb") as f:
        source = f.read()
    with open(args.names) as f:
        names = [line.strip() for line in f if line.strip()]
    archs = [a for a in args.archs.replace(",", ";").split(";") if a]
    options = build_options(args.include)
    os.makedirs(args.out_dir, exist_ok=True)

    images, lowered_by_arch, usage = {}, {}, {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        jobs = {pool.submit(compile_one, lib, source, os.path.basename(args.source), arch,
                            options + ([] if arch.startswith("compute_") else [VERBOSE_PTXAS]),
                            names): arch for arch in archs}
        try:
            for job in concurrent.futures.as_completed(jobs):
                arch = jobs[job]
                images[arch], lowered_by_arch[arch], seconds, usage[arch] = job.result()
                spilling = sum(1 for u in usage[arch].values() if u[1] or u[2])
                print(f"nvrtc {major.value}.{minor.value}: {arch}, {len(names)} kernels, "
                      f"{len(images[arch]) / 1e6:.1f} MB, {seconds:.0f} s"
                      + (f", {spilling} of them spill" if usage[arch] else ""), flush=True)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
    lowered = lowered_by_arch[archs[0]]
    for arch in archs[1:]:
        if lowered_by_arch[arch] != lowered:
            print(f"lowered names differ between {archs[0]} and {arch}", file=sys.stderr)
            return 1
    blobs = {a: images[a] + b"\0" for a in archs}  # PTX: the terminating NUL; cubin: ignored
    compressed = {}
    if args.compress:  # zlib releases the GIL: one thread per image
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            compressed = dict(zip(archs, pool.map(lambda a: compress(blobs[a]), archs)))
    stored = write_outputs(args.out_dir, archs, blobs, names, lowered, version, compressed)
    print(f"embedded images: {sum(stored.values()) / 1e6:.1f} MB"
          + (f" (zlib, {sum(map(len, blobs.values())) / 1e6:.1f} MB inflated)"
             if compressed else ""), flush=True)
    with open(os.path.join(args.out_dir, "kernel_resources.tsv"), "w") as f:
        f.write("arch\tregisters\tspill_store_bytes\tspill_load_bytes\tkernel\n")
        for arch in archs:
            for name in names:
                if name in usage[arch]:
                    f.write(f"{arch}\t" + "\t".join(map(str, usage[arch][name])) + f"\t{name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
