"""The host side of the GPU path, run on any machine: tfbn._core against a fake CUDA driver.

tests/fake_cuda/fake_libcuda.c is built here as libcuda.so.1 and put first on the
LD_LIBRARY_PATH of a child process (tests/fake_cuda/host_path.py), where _core opens it as
it would NVIDIA's. Kernels do not run; everything before them does: the entry points'
checks, the launch plans, the kernel names against the embedded images, the image a GPU
gets, module loading per context, the launches' arguments and sizes, workspace
allocation, and the error messages. The fake refuses what a driver would (a kernel not in
the image, a launch outside its stream's context, block or grid sizes no GPU takes,
fewer or more arguments than the kernel's parameters per the PTX) and what would leak.

The kernels themselves, and the TensorFlow GPU kernels, need a GPU: tests/gpu and
tests/test_tf_gpu.py."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

import tfbn

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_cuda")

pytestmark = pytest.mark.skipif(not tfbn.build_info()["cuda"], reason="built without CUDA")


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the fake driver")
    folder = tmp_path_factory.mktemp("fake_cuda")
    library = folder / "libcuda.so.1"
    subprocess.run([compiler, "-O1", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(library),
                    os.path.join(HERE, "fake_libcuda.c"), "-lpthread"], check=True)
    return library


@pytest.fixture(scope="module")
def run(fake_driver):
    found = glob.glob(os.path.join(os.path.dirname(tfbn.__file__), "_core.*"))
    assert found, "tfbn._core is not installed"

    def run(scenario, compute_capability="90"):
        env = dict(os.environ, FAKE_CUDA_CC=compute_capability,
                   LD_LIBRARY_PATH=os.pathsep.join(
                       [str(fake_driver.parent)] + [p for p in [os.environ.get(
                           "LD_LIBRARY_PATH")] if p]))
        done = subprocess.run(
            [sys.executable, os.path.join(HERE, "host_path.py"), found[0], str(fake_driver),
             scenario], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    return run


@pytest.mark.parametrize("compute_capability, image", [("90", "sm_90"), ("100", "ptx")])
def test_every_entry_point_launches_kernels_of_the_build(run, compute_capability, image):
    """Every entry point, in every dtype, both layouts and every mode, aligned or not: no
    error, and every launch names a kernel of the image with its number of arguments (the
    PTX image says how many each kernel takes)."""
    r = run("matrix", compute_capability)
    assert r["errors"] == [], r["errors"][:10]
    assert r["image"] == image
    assert r["calls"] > 1000 and len(r["launches"]) > r["calls"]
    if image == "ptx":
        assert all(launch["params"] >= 0 for launch in r["launches"])
    wrong = [launch for launch in r["launches"]
             if launch["params"] >= 0 and launch["args"] != launch["params"]]
    assert wrong == []
    assert r["module_loads"] == 1
    assert r["allocations_outstanding"] == 0  # every workspace freed
    # and every kernel of the image is launched by some case: none is built for nothing,
    # and no launch path goes untried (the lookups: each kernel once, at the first launch)
    launched = {launch["kernel"] for launch in r["launches"]}
    assert len(launched) == (r["image_kernels"] if image == "ptx" else r["function_lookups"])
    # the rows reduction addresses its shared memory as [V][TY][TX] with TX * TY == 256
    rows = [launch["block"] for launch in r["launches"] if "ReduceRowsKernel" in launch["kernel"]]
    assert rows and all(int(x) * int(y) * int(z) == 256 for x, y, z in (b.split(",") for b in rows))


@pytest.mark.parametrize("compute_capability, image", [
    ("60", "sm_60"), ("61", "sm_60"), ("70", "sm_70"), ("72", "sm_70"), ("75", "sm_75"),
    ("80", "sm_80"), ("86", "sm_86"), ("87", "sm_86"), ("89", "sm_89"), ("90", "sm_90"),
    ("100", "ptx"), ("120", "ptx")])
def test_each_gpu_gets_the_newest_image_it_can_run(run, compute_capability, image):
    """SASS of the same major version and the highest minor not above the GPU's, else the
    PTX, which the driver compiles for a newer GPU."""
    r = run("image", compute_capability)
    assert r["error"] is None
    assert r["image"] == image
    assert r["launches"] > 0


def test_a_gpu_older_than_every_image_gets_a_clear_error(run):
    r = run("image", "52")
    assert r["launches"] == 0
    assert "none of which runs on a GPU of compute capability 5.2" in r["error"]
    assert "sm_60" in r["error"]


def test_a_context_loads_its_kernels_once_and_a_new_context_again(run):
    """All kernels are resolved at the first launch in a context (so no later launch loads
    one); a context created with a destroyed one's handle gets a module of its own."""
    r = run("lifecycle")
    loads, lookups = r["after_first"]
    assert loads == 1 and lookups > 400
    assert r["after_second"] == [1, lookups]
    assert r["after_new_context"] == [2, 2 * lookups]


def test_error_messages_name_their_own_cause(run):
    r = run("lifecycle")
    assert "cuStreamGetCtx" in r["dead_stream"]
    assert "no CUDA context is current for the default stream" in r[
        "default_stream_no_context"]
    # a refusal of the launcher's own (2^31 channels) carries no detail of the earlier ones
    refusal = r["launcher_refusal"]
    assert "merge_moments" in refusal and "CUresult 1)" in refusal
    assert "default stream" not in refusal and "cuStreamGetCtx" not in refusal
    assert r["allocations_outstanding"] == 0


def test_threads_launching_into_a_new_context_at_once(run):
    r = run("threads")
    assert r["errors"] == []
    assert r["module_loads"] == 1
    assert r["launches"] >= 8 * 20
    assert r["allocations_outstanding"] == 0
