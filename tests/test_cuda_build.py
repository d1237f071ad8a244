"""The CUDA variant of the build, checked on any machine (no GPU needed): build_info reports
it, the kernels were compiled by NVRTC for every architecture, and the libraries link no
CUDA library and bind no CUDA symbol (the driver is opened with dlopen at the first GPU
launch). Skips for a CPU-only build (-DTFBN_CUDA=OFF)."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

import tfbn

INFO = tfbn.build_info()
pytestmark = pytest.mark.skipif(not INFO["cuda"], reason="tfbn was built without CUDA")

ARCHS = ["sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]
# CUDA runtime (cudaLaunchKernel, __cudaRegisterFatBinary) and driver (cuLaunchKernel)
# entry points: C names.
CUDA_SYMBOL = re.compile(r"^(_{0,2}cuda[A-Z_]|cu[A-Z][a-zA-Z]+(_v\d)?$)")


def libraries():
    folder = os.path.dirname(tfbn.__file__)
    return [INFO["ops_library"]] + glob.glob(os.path.join(folder, "_core.*"))


def tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} (binutils) is not installed")
    return path


def dynamic_symbols(path, which):
    out = subprocess.run([tool("nm"), "-D", which, path], check=True, capture_output=True,
                         text=True)
    return [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]


def test_build_info_reports_nvrtc_and_every_architecture():
    assert INFO["cuda"] is True
    assert INFO["cuda_version"] == "12.5"
    assert INFO["cuda_architectures"] == ARCHS
    from tfbn import _core

    assert _core.cuda_compiler_version() == 12050
    assert _core.cuda_architectures().split() == ARCHS


@pytest.mark.parametrize("which", ["--undefined-only", "--defined-only"])
def test_no_cuda_symbol_is_bound_or_exported(which):
    """Nothing for the dynamic linker to resolve against a CUDA library (or TensorFlow's
    runtime stubs), and nothing exported that could shadow one."""
    for path in libraries():
        found = [s for s in dynamic_symbols(path, which) if CUDA_SYMBOL.match(s)]
        assert not found, f"{os.path.basename(path)}: {which} CUDA symbols {found[:8]}"


def test_no_cuda_library_is_needed():
    for path in libraries():
        out = subprocess.run([tool("readelf"), "-d", path], check=True, capture_output=True,
                             text=True).stdout
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
        assert needed, f"readelf found no DT_NEEDED in {path}"
        cuda = [n for n in needed if re.match(r"lib(cuda|cudart|nvrtc|cublas|cudnn)", n)]
        assert not cuda, f"{os.path.basename(path)} needs {cuda}"


def test_images_are_embedded_for_every_architecture():
    """The kernels' images travel inside the libraries: a cubin's ELF header per sm_XX and
    the PTX text of compute_90, both in each library."""
    for path in libraries():
        with open(path, "rb") as f:
            data = f.read()
        assert data.count(b"\x7fELF") >= 1 + len(ARCHS) - 1, os.path.basename(path)
        assert b".target sm_90" in data, f"{os.path.basename(path)} lacks the compute_90 PTX"


def test_core_module_answers_without_a_gpu():
    from tfbn import _core

    assert _core.cuda_built is True
    if _core.cuda_device_count() == 0:
        assert _core.cuda_available() is False
    assert _core.cuda_workspace_bytes([8, 4], "float32") > 0


def test_importing_and_running_on_the_cpu_never_opens_libcuda():
    """A CPU-only process never loads the driver: it is opened at the first GPU launch."""
    code = ("import numpy as np, tfbn, tensorflow as tf\n"
            "tfbn.batch_norm(tf.constant(np.ones((4, 3), np.float32)))\n"
            "maps = open('/proc/self/maps').read()\n"
            "print('libcuda.so' in maps)\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout
