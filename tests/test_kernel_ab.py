"""benchmarks/kernel_ab: the A/B tool for kernel changes builds, times every kernel it
names, and finds the same bits where base and working tree have the same kernels."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "kernel_ab", "ab.sh")
OPS = "mgewapdqMG"


def _cpu_has_avx512_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512_bf16" in f.read()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(
    not (_cpu_has_avx512_bf16() and shutil.which("g++") and shutil.which("git")
         and os.path.isdir(os.path.join(ROOT, ".git"))),
    reason="needs an avx512_bf16 CPU, g++ and a git checkout")


def test_kernel_ab_times_every_kernel_and_compares_bits():
    env = dict(os.environ, REPS="3", INNER="20")
    run = subprocess.run([SCRIPT, "--base", "HEAD", "47360", "fbh", "2", OPS, "64", "37"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["f32"] * 2 + ["bf16"] * 2 + ["f16"] * 2
    for line in lines:
        assert re.findall(r" (\w) [\d.]+/[\d.]+=[\d.]+x", line) == list(OPS), line
    kernels_unchanged = subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", "cc"], cwd=ROOT).returncode == 0
    if kernels_unchanged:
        assert "BITS DIFFER" not in run.stdout, run.stdout


@pytest.mark.parametrize("args, message", [
    (["4096", "f", "1", "mz", "16"], "unknown op 'z'"),
    (["4000", "f", "1", "m", "48"], "ELEMENTS 4000 is not a multiple of C * INNER = 48 * 1"),
])
def test_kernel_ab_rejects_bad_arguments(args, message):
    run = subprocess.run([SCRIPT, "--base", "HEAD", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and message in run.stderr, run.stderr
