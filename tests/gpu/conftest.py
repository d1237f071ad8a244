"""GPU tests: the core CUDA kernels through tfbn._core on PyTorch device tensors.

They need no TensorFlow: the module is loaded from its file (TFBN_CORE_PATH, set by
benchmarks/gpu/check.sh, or the installed tfbn package's _core), without importing the
tfbn package. Everything here skips cleanly without a GPU, without PyTorch, or with a
build that has no CUDA.
"""

import glob
import importlib.util
import os
import sys

import numpy as np
import pytest

# tests/reference.py (the float64 reference), whatever pytest takes as its rootdir.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _core_path():
    path = os.environ.get("TFBN_CORE_PATH")
    if path:
        return path
    spec = importlib.util.find_spec("tfbn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "_core.*")))
        if found:
            return found[0]
    return None


def _load_core():
    path = _core_path()
    if path is None or not os.path.exists(path):
        return None, "tfbn._core not found (set TFBN_CORE_PATH or install tfbn)"
    spec = importlib.util.spec_from_file_location("_core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not getattr(module, "cuda_built", False):
        return None, f"{path} was built without CUDA"
    if not module.cuda_available():
        return None, "no CUDA device (or no usable driver: libcuda.so.1)"
    return module, None


@pytest.fixture(scope="session")
def torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA device")
    return torch


@pytest.fixture(scope="session")
def core(torch):
    module, why = _load_core()
    if module is None:
        pytest.skip(why)
    return module


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def bn(core, torch):
    return CudaBatchNorm(core, torch)


class CudaBatchNorm:
    """Calls the CUDA entry points on torch tensors, allocating the outputs."""

    def __init__(self, core, torch):
        self.core = core
        self.torch = torch

    def param_dtype(self, x):
        return self.torch.float64 if x.dtype == self.torch.float64 else self.torch.float32

    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream

    def forward(self, x, scale=None, offset=None, mean=None, variance=None, *, axis=-1,
                epsilon=1e-3, training=True):
        torch = self.torch
        c = x.shape[axis]
        u = self.param_dtype(x)
        y = torch.empty_like(x)
        bm, bv, lo = (torch.empty(c, dtype=u, device=x.device) for _ in range(3))
        self.core.cuda_batch_norm_forward(
            x, scale, offset, mean, variance, y=y, batch_mean=bm, batch_variance=bv,
            mean_lo=lo, axis=axis, epsilon=epsilon, training=training, stream=self.stream())
        return y, bm, bv, lo

    def backward(self, dy, x, scale=None, mean=None, variance=None, mean_lo=None,
                 d_batch_mean=None, d_batch_variance=None, *, axis=-1, epsilon=1e-3,
                 training=True):
        torch = self.torch
        c = x.shape[axis]
        u = self.param_dtype(x)
        dx = torch.empty_like(x)
        ds, do = (torch.empty(c, dtype=u, device=x.device) for _ in range(2))
        self.core.cuda_batch_norm_backward(
            dy, x, scale, mean, variance, mean_lo, d_batch_mean, d_batch_variance, dx=dx,
            dscale=ds, doffset=do, axis=axis, epsilon=epsilon, training=training,
            stream=self.stream())
        return dx, ds, do
