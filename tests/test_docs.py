"""The documents' figures against the committed benchmark results: every generated table
in README.md and docs/ is what benchmarks/tables.py renders from benchmarks/results, and no
timing or speed-up figure sits outside those tables."""

import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import tables  # noqa: E402

# A measured figure: a speed-up ("1.39x"), a time ("35.7 ms", "70 us"), a rate ("27.6
# steps/s", "42 GB/s") or a share of a yardstick ("101%").
FIGURE = re.compile(r"\b\d+(\.\d+)?(x\b| ?(ms|us|µs|steps/s|images/s|GB/s)\b|%)")


def read(doc):
    with open(os.path.join(ROOT, doc)) as f:
        return f.read()


@pytest.mark.parametrize("doc", tables.DOCUMENTS)
def test_tables_match_the_committed_results(doc):
    text = read(doc)
    assert text == tables.render(text), (
        f"{doc} is stale: run `make docs` (python benchmarks/tables.py --write)")


@pytest.mark.parametrize("doc", tables.DOCUMENTS)
def test_no_figure_outside_the_generated_tables(doc):
    lines = tables.outside_regions(read(doc)).splitlines()
    found = [line for line in lines if FIGURE.search(line)]
    assert not found, f"{doc}: figures not rendered from benchmarks/results: {found}"


def test_readme_is_short_and_starts_with_the_two_commands():
    text = read("README.md")
    assert len(text.splitlines()) <= 150
    first_block = text.split("```")[1]
    assert "make bench" in first_block and "make test" in first_block
    assert "Eigen" not in text  # the CPU kernels are hand-vectorised per instruction set


def test_wrong_results_are_flagged(monkeypatch):
    """A contender whose result disagrees is marked "!" in the rendered tables."""
    real = tables.load

    def with_disagreement(name):
        data = real(name)
        if name == "epilogue.json":
            r = data["records"][0]["results"]["fbv3+tf"]
            r.update(agrees=False, max_rel_error_vs_float64=0.5)
        if name == "op_bench.json":
            rec = next(r for r in data["records"]
                       if r["dtype"] == "float32" and r["mode"] == "train_bwd")
            rec["results"]["fused_v3"]["agrees"] = False
        return data

    monkeypatch.setattr(tables, "load", with_disagreement)
    assert "ms! (" in tables.epilogue() and "! wrong result" in tables.epilogue()
    assert "ms! (" in tables.op_float32_train()
    assert "(1!)" in tables.op_summary()
