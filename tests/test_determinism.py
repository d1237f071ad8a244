"""Bitwise identical results for any intra-op thread count and across runs."""

import os
import subprocess
import sys

import numpy as np

import tfbn

PROBE = os.path.join(os.path.dirname(__file__), "determinism_probe.py")


def run_probe(threads, isa=None):
    env = dict(os.environ)
    env.pop("TFBN_CPU_ISA", None)
    if isa:
        env["TFBN_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, PROBE, str(threads)], check=True, env=env,
                         capture_output=True, text=True, timeout=600)
    return out.stdout.strip().splitlines()[-1]


def test_same_bits_for_one_two_and_three_threads():
    digests = {n: run_probe(n) for n in (1, 2, 3)}
    assert len(set(digests.values())) == 1, digests


def test_same_bits_for_every_instruction_set():
    """The kernels built for baseline x86-64, AVX2 and the best available set agree."""
    digests = {isa: run_probe(2, isa) for isa in ("generic", "avx2", None)}
    assert len(set(digests.values())) == 1, digests


def test_same_bits_across_repeated_calls():
    x = np.random.default_rng(0).normal(5.0, 2.0, (64, 14, 14, 64)).astype(np.float32)
    first = [t.numpy() for t in tfbn.batch_norm(x)]
    for _ in range(3):
        again = [t.numpy() for t in tfbn.batch_norm(x)]
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes()
