"""The weighted split kernels give the same bits for every instruction set: built for
baseline x86-64, AVX2 and AVX-512 alone (where this processor runs them) and as the
library builds them (one version per set, picked at load time)."""

import os
import platform
import shutil
import subprocess

import pytest
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CXX = shutil.which("g++")
ISAS = {
    "baseline": ("", []),
    "avx2": ("avx2", ["-mavx2"]),
    # Eigen refuses -mavx512f without -mfma; -ffp-contract=off keeps FMA out of the math.
    "avx512": ("avx512f", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2",
                           "-mfma", "-mprefer-vector-width=512"]),
}


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(CXX is None or platform.machine() != "x86_64",
                    reason="needs g++ on x86-64")
def test_weighted_kernels_give_the_same_bits_for_every_instruction_set(tmp_path):
    flags = cpu_flags()
    common = ["-O2", "-std=c++17", "-ffp-contract=off", "-Wno-psabi",
              "-DEIGEN_MAX_ALIGN_BYTES=64", "-I" + os.path.join(ROOT, "cc"),
              "-isystem", tf.sysconfig.get_include(),
              os.path.join(ROOT, "cc", "core", "batch_norm_weighted.cc"),
              os.path.join(HERE, "weighted_isa_harness.cc")]
    builds = {"library (clones)": []}
    for name, (flag, options) in ISAS.items():
        if not flag or flag in flags:
            builds[name] = ["-DTFBN_CLONES="] + options
    digests = {}
    for name, options in builds.items():
        exe = str(tmp_path / name.split()[0])
        subprocess.run([CXX, *options, *common, "-o", exe], check=True, timeout=300)
        digests[name] = subprocess.run([exe], check=True, capture_output=True, text=True,
                                       timeout=120).stdout.strip()
    assert len(digests) >= 2
    assert len(set(digests.values())) == 1, digests


@pytest.mark.skipif(CXX is None or platform.machine() != "x86_64",
                    reason="needs g++ on x86-64")
def test_weighted_kernels_stay_in_bounds_under_address_sanitizer(tmp_path):
    """The harness's layouts include rows wider than the kernels' stack buffers."""
    exe = str(tmp_path / "asan")
    build = subprocess.run(
        [CXX, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-std=c++17", "-ffp-contract=off", "-Wno-psabi", "-DEIGEN_MAX_ALIGN_BYTES=64",
         "-I" + os.path.join(ROOT, "cc"), "-isystem", tf.sysconfig.get_include(),
         os.path.join(ROOT, "cc", "core", "batch_norm_weighted.cc"),
         os.path.join(HERE, "weighted_isa_harness.cc"), "-o", exe],
        capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "asan" in build.stderr.lower():
        pytest.skip("the address sanitizer's runtime is not installed")
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
