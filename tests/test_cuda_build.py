"""The CUDA variant of the build, checked on any machine (no GPU needed): build_info reports
it, and the compiled libraries carry their own CUDA runtime instead of binding to
TensorFlow's runtime stubs. Skips for a CPU-only build (-DTFBN_CUDA=OFF)."""

import glob
import os
import re
import shutil
import subprocess

import pytest

import tfbn

INFO = tfbn.build_info()
pytestmark = pytest.mark.skipif(not INFO["cuda"], reason="tfbn was built without CUDA")

# CUDA runtime API entry points (cudaLaunchKernel, __cudaRegisterFatBinary, ...): C names.
RUNTIME_SYMBOL = re.compile(r"^_{0,2}cuda[A-Z_]")


def libraries():
    folder = os.path.dirname(tfbn.__file__)
    return [INFO["ops_library"]] + glob.glob(os.path.join(folder, "_core.*"))


def dynamic_symbols(path, which):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run([nm, "-D", which, path], check=True, capture_output=True, text=True)
    return [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]


def test_build_info_reports_cuda():
    assert INFO["cuda"] is True
    assert INFO["cuda_architectures"] == ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90",
                                          "compute_90"]


@pytest.mark.parametrize("which", ["--undefined-only", "--defined-only"])
def test_cuda_runtime_is_linked_in_and_private(which):
    """No CUDA runtime symbol is left for the dynamic linker (where TensorFlow's stubs
    would win), and none is exported (where it could shadow another runtime)."""
    for path in libraries():
        found = [s for s in dynamic_symbols(path, which) if RUNTIME_SYMBOL.match(s)]
        assert not found, f"{os.path.basename(path)}: {which} CUDA runtime symbols {found[:8]}"


def test_core_module_reports_cuda_without_a_gpu():
    from tfbn import _core

    assert _core.cuda_built is True
    assert _core.cuda_runtime_version() >= 12000
    # Without a GPU (or a driver) these answer instead of failing.
    if _core.cuda_device_count() == 0:
        assert _core.cuda_available() is False
    assert _core.cuda_workspace_bytes([8, 4], "float32") > 0
