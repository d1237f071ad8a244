"""Register budget of the CUDA kernels that move the bytes, checked on any machine (no GPU).

Every reduction and elementwise kernel caps its registers with __launch_bounds__ so that
enough warps stay resident to hide memory latency. Where a kernel's values do not fit
under the cap, ptxas spills them to local memory, and the kernel then moves bytes its
inputs do not account for: the bfloat16 epilogue backward's sums pass spilled 404 bytes per
thread on sm_90 and ran at 0.90x of separate kernels on an H200, where float32, without
spills, ran at 1.31x.

This test has NVRTC (the build's compiler, from the pinned wheel, with the build's options)
compile the fast path of every reduction and elementwise kernel (16-byte vector loads; the
rows reduction also without, for channel counts that are not a multiple of a vector) for
float32, float16 and bfloat16, and asks ptxas how many bytes each spills. A few bytes are
loop-invariant 64-bit scalars that ptxas parks in L1-cached local memory outside the hot
loop; more than SPILL_BUDGET means the loop's own values spill."""

import concurrent.futures
import os
import sys

import pytest

import tfbn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "cmake"))
import nvrtc_compile  # noqa: E402

pytestmark = pytest.mark.skipif(not tfbn.build_info()["cuda"], reason="built without CUDA")

SPILL_BUDGET = 32  # bytes of spill stores per thread
# The data-center cards training runs on (A100, H100/H200), a consumer card (Ada), and the
# oldest of TensorFlow's list.
ARCHS = ["sm_60", "sm_80", "sm_89", "sm_90"]
VEC = {"float": 4, "__half": 8, "__nv_bfloat16": 8}  # elements per 16-byte load
ACTIVATIONS = range(4)  # identity, relu, relu6, silu


def reduce_ops(t):
    yield f"MomentsOp<{t}>"
    yield f"GradSumsOp<{t}>"
    for a in ACTIVATIONS:
        yield f"EpilogueGradSumsOp<{t}, {a}>"


def apply_ops(t):
    yield f"ForwardApply<{t}>"
    yield f"GradApply<{t}>"
    yield f"GradApplyDyOnly<{t}>"
    for a in ACTIVATIONS:
        for residual in ("false", "true") if a else ("true",):  # identity alone: ForwardApply
            yield f"EpilogueForwardApply<{t}, {a}, {residual}>"


def hot_kernels():
    ns = "tfbn::cuda::"
    for t, v in VEC.items():
        for op in reduce_ops(t):
            for aligned in ("true", "false"):  # false: channels not a multiple of the vector
                yield f"{ns}ReduceRowsKernel<{ns}{op}, {aligned}>"
            for threads_per_channel in (64, 256):
                yield f"{ns}ReducePlanesKernel<{ns}{op}, {v}, {threads_per_channel}>"
        for op in apply_ops(t):
            yield f"{ns}ApplyRowsKernel<{ns}{op}>"
            for mixed in ("false", "true"):
                yield f"{ns}ApplyFlatKernel<{ns}{op}, {v}, {mixed}>"
        for a in ACTIVATIONS:
            yield f"{ns}EpilogueGradRowsKernel<{t}, {a}>"
            yield f"{ns}EpilogueGradFlatKernel<{t}, {a}, {v}>"


def nvidia_root():
    nvrtc = pytest.importorskip("nvidia.cuda_nvrtc", reason="the NVRTC wheel is not installed")
    return os.path.dirname(os.path.dirname(os.path.abspath(nvrtc.__path__[0])))


@pytest.fixture(scope="module")
def usage():
    """{arch: {kernel: (registers, spill store bytes, spill load bytes)}}"""
    root = nvidia_root()
    lib = nvrtc_compile.load_nvrtc(os.path.join(root, "nvidia", "cuda_nvrtc", "lib",
                                                "libnvrtc.so.12"))
    includes = [os.path.join(ROOT, "cc"), os.path.join(root, "nvidia", "cuda_runtime", "include"),
                os.path.join(root, "nvidia", "cuda_cccl", "include")]
    options = nvrtc_compile.build_options(includes) + [nvrtc_compile.VERBOSE_PTXAS]
    source_path = os.path.join(ROOT, "cc", "core", "cuda", "kernels.cu")
    with open(source_path, "rb") as f:
        source = f.read()
    names = list(hot_kernels())
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        jobs = {arch: pool.submit(nvrtc_compile.compile_one, lib, source, "kernels.cu", arch,
                                  options, names) for arch in ARCHS}
        return {arch: job.result()[3] for arch, job in jobs.items()}


def test_ptxas_reports_every_hot_kernel(usage):
    """The log parser finds each kernel, so the budget below cannot pass by missing one."""
    for arch in ARCHS:
        missing = set(hot_kernels()) - set(usage[arch])
        assert not missing, f"{arch}: no ptxas report for {sorted(missing)[:3]}"
        assert all(0 < u[0] <= 255 for u in usage[arch].values())


@pytest.mark.parametrize("arch", ARCHS)
def test_hot_kernels_stay_within_the_spill_budget(usage, arch):
    over = {name: u for name, u in usage[arch].items() if u[1] > SPILL_BUDGET}
    report = "\n".join(f"  {u[1]} bytes spilled ({u[0]} registers): {name}"
                       for name, u in sorted(over.items(), key=lambda item: -item[1][1]))
    assert not over, f"{arch}: {len(over)} kernels spill more than {SPILL_BUDGET} bytes\n{report}"
