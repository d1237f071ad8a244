"""Bitwise identical results for any intra-op thread count, across runs, and for every
instruction set the CPU kernels are built for (each forced with TFBN_CPU_ISA, in a fresh
process, and checked to have really run)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tfbn
from tfbn import _core

PROBE = os.path.join(os.path.dirname(__file__), "helpers", "determinism_probe.py")
ISAS = ("generic", "avx2", "avx512", "avx512_bf16")
SUPPORTED = _core.cpu_instruction_set_info()["supported"]


def run_probe(threads, isa=None):
    env = dict(os.environ)
    env.pop("TFBN_CPU_ISA", None)
    if isa is not None:
        env["TFBN_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, PROBE, str(threads)], check=True, env=env,
                         capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["stderr"] = out.stderr
    return result


@pytest.fixture(scope="module")
def forced():
    """The probe once per instruction set this processor supports, forced."""
    return {isa: run_probe(2, isa) for isa in ISAS if isa in SUPPORTED}


def test_same_bits_for_one_two_and_three_threads():
    digests = {n: run_probe(n)["digest"] for n in (1, 2, 3)}
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("isa", ISAS)
def test_a_forced_instruction_set_really_runs(forced, isa):
    if isa not in SUPPORTED:
        pytest.skip(f"this processor lacks {isa} (it supports {' '.join(SUPPORTED)})")
    result = forced[isa]
    assert result["isa"] == isa, result
    assert result["requested"] == isa and result["warning"] is None, result
    assert "tfbn: warning" not in result["stderr"]


def test_same_bits_for_every_instruction_set(forced):
    """Generic, AVX2, AVX-512 and AVX-512 BF16 kernels (each one that runs here) give the
    same bytes."""
    if len(forced) < 2:
        pytest.skip(f"only {' '.join(SUPPORTED)} runs here: nothing to compare")
    digests = {isa: result["digest"] for isa, result in forced.items()}
    assert len(set(digests.values())) == 1, digests


def test_the_default_is_the_best_supported_instruction_set():
    result = run_probe(2)
    assert result["isa"] == SUPPORTED[-1], result
    assert result["requested"] is None and result["warning"] is None, result


def test_an_unknown_instruction_set_is_not_silent():
    env = dict(os.environ, TFBN_CPU_ISA="avx9000")
    code = ("from tfbn import _core; import json; "
            "print(json.dumps(_core.cpu_instruction_set_info()))")
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env,
                         capture_output=True, text=True, timeout=300)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["isa"] == SUPPORTED[-1]
    assert info["requested"] == "avx9000"
    assert "TFBN_CPU_ISA=avx9000 is not an instruction set" in info["warning"]
    assert "tfbn: warning: TFBN_CPU_ISA=avx9000" in out.stderr


def test_same_bits_across_repeated_calls():
    x = np.random.default_rng(0).normal(5.0, 2.0, (64, 14, 14, 64)).astype(np.float32)
    first = [t.numpy() for t in tfbn.batch_norm(x)]
    for _ in range(3):
        again = [t.numpy() for t in tfbn.batch_norm(x)]
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes()
