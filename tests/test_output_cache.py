"""tfbn's cache of large CPU outputs (used where TensorFlow's CPU allocator is the plain
one: oneDNN off). The same bits with the cache, without it, and with oneDNN on, and no
output corrupted while blocks are recycled (helpers/output_cache_probe.py); no fresh pages
per call where malloc would give them (helpers/page_fault_probe.py)."""

import json
import os
import subprocess
import sys

import pytest

HELPERS = os.path.join(os.path.dirname(__file__), "helpers")
PROBE = os.path.join(HELPERS, "output_cache_probe.py")
FAULT_PROBE = os.path.join(HELPERS, "page_fault_probe.py")
# The 25 MB output is 6272 pages of 4 KiB.
OUTPUT_PAGES = 32 * 56 * 56 * 64 * 4 // 4096


def run_probe(onednn, cache_bytes=None, probe=PROBE, env_extra=None):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn)
    env.pop("TFBN_OUTPUT_CACHE_BYTES", None)
    env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
    if cache_bytes is not None:
        env["TFBN_OUTPUT_CACHE_BYTES"] = str(cache_bytes)
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, probe], check=True, env=env, capture_output=True,
                         text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results():
    return {
        "off, cache": run_probe("0"),
        # Room for a few blocks only: most go back to malloc, some are reused.
        "off, small cache": run_probe("0", cache_bytes=8 << 20),
        "off, no cache": run_probe("0", cache_bytes=0),
        "on": run_probe("1"),
    }


@pytest.mark.parametrize("setting", ["off, cache", "off, small cache", "off, no cache", "on"])
def test_recycled_outputs_stay_intact(results, setting):
    result = results[setting]
    assert result["outputs"] > 50
    assert result["differed"] == [], result


def test_same_bits_with_and_without_the_cache(results):
    digests = {name: r["digest"] for name, r in results.items()}
    assert len(set(digests.values())) == 1, digests


def fault_probe(cache_bytes=None):
    return run_probe("0", cache_bytes, probe=FAULT_PROBE,
                     env_extra={"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})["faults_per_call"]


def test_without_the_cache_malloc_gives_fresh_pages():
    """The probe's setting does provoke them: the check below can fail."""
    assert fault_probe(cache_bytes=0) > OUTPUT_PAGES / 10


def test_with_the_cache_no_fresh_pages_per_call():
    assert fault_probe() < OUTPUT_PAGES / 100
