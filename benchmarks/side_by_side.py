"""Side by side: tfbn's own times across dtypes and layouts, measured in the same rounds.

The op benchmark times each (shape, dtype, layout) case on its own, minutes apart from its
twins; on a shared machine the load changes in between, and a ratio of two such times
(half precision over float32, NCHW over NHWC) moves with it. Here, per ResNet-50 shape and
training mode, tfbn runs in NHWC and NCHW, each in float32, bfloat16 and float16: all six
in the same rounds (timing.round_robin: per round and callable one untimed call, then
BLOCK timed calls back to back, their median). Each ratio is taken per round, from times
measured seconds apart, and its median over the rounds is reported:

- half_speedup[layout][dtype] = float32 time / dtype's time, same layout;
- nchw_over_nhwc[dtype] = NCHW time / NHWC time, same dtype (same element count).

`python benchmarks/side_by_side.py [--quick]` or `python benchmarks/run.py --only pairs`.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contenders
import op_bench
from timing import median_ms, round_robin

LAYOUTS = ("NHWC", "NCHW")
DTYPES = ("float32", "bfloat16", "float16")
HALVES = ("bfloat16", "float16")
MODES = ("train_fwd", "train_bwd")
ROUNDS = 7
BLOCK = 4


def cases(nhwc):
    n, h, w, c = nhwc
    return {"NHWC": op_bench.Case(nhwc, -1, "NHWC"),
            "NCHW": op_bench.Case((n, c, h, w), 1, "NCHW")}


def run_shape(nhwc, mode, rounds, budget_s):
    fns = {}
    for layout, case in cases(nhwc).items():
        for dtype in DTYPES:
            inputs = op_bench.make_inputs(case, dtype)
            fns[(layout, dtype)] = contenders.tfbn_op(case, mode, inputs)
            fns[(layout, dtype)]()  # traces
    samples, _ = round_robin(fns, rounds, min(3, rounds), budget_s, block=BLOCK)
    n = min(len(v) for v in samples.values())

    def ratio(a, b):  # median over the rounds of samples[a] / samples[b]
        return statistics.median(samples[a][r] / samples[b][r] for r in range(n))

    return {
        "shape_nhwc": list(nhwc), "mode": mode, "rounds": n, "block": BLOCK,
        "ms": {f"{layout} {dtype}": median_ms(samples[(layout, dtype)])
               for layout in LAYOUTS for dtype in DTYPES},
        "half_speedup": {layout: {d: ratio((layout, "float32"), (layout, d)) for d in HALVES}
                         for layout in LAYOUTS},
        "nchw_over_nhwc": {d: ratio(("NCHW", d), ("NHWC", d)) for d in DTYPES},
    }


def run(quick=False, rounds=None, budget_s=30.0, log=sys.stderr):
    rounds = rounds or (3 if quick else ROUNDS)
    shapes = [(32, 56, 56, 64)] if quick else op_bench.RESNET50
    records = []
    for nhwc in shapes:
        for mode in MODES:
            t0 = time.perf_counter()
            rec = run_shape(nhwc, mode, rounds, budget_s)
            records.append(rec)
            h, x = rec["half_speedup"], rec["nchw_over_nhwc"]
            print(f"  {str(nhwc):20s} {mode:9s} n={rec['rounds']} "
                  f"fp32/half NHWC bf16 {h['NHWC']['bfloat16']:.2f} fp16 "
                  f"{h['NHWC']['float16']:.2f}, NCHW bf16 {h['NCHW']['bfloat16']:.2f} fp16 "
                  f"{h['NCHW']['float16']:.2f}; NCHW/NHWC "
                  + " ".join(f"{d} {x[d]:.2f}" for d in DTYPES)
                  + f"  ({time.perf_counter() - t0:.0f}s)", file=log, flush=True)
    return {"records": records, "rounds": rounds, "block": BLOCK, "summary": summary(records)}


def summary(records):
    """{name: {median, lowest, highest, goal, meeting, of}} over the records: float32 / half
    (goal: at least 1.6x) and NCHW / NHWC (goal: within 10%)."""
    def entry(v, goal, meets):
        return {"median": statistics.median(v), "lowest": min(v), "highest": max(v),
                "goal": goal, "meeting": sum(map(meets, v)), "of": len(v)}

    out = {}
    for dtype in HALVES:
        v = [r["half_speedup"][layout][dtype] for r in records for layout in LAYOUTS]
        out[f"float32 / {dtype}"] = entry(v, "at least 1.6x", lambda x: x >= 1.6)
    for dtype in DTYPES:
        v = [r["nchw_over_nhwc"][dtype] for r in records]
        out[f"NCHW / NHWC {dtype}"] = entry(v, "within 10%", lambda x: abs(x - 1) <= 0.1)
    return out


def table(res):
    lines = ["", f"tfbn side by side (median over {res['rounds']} rounds of per-round ratios; "
                 f"each time the median of {res['block']} back-to-back calls)",
             f"  {'shape (NHWC)':20s} {'mode':9s} {'fp32 ms':>8s} | float32 / half: NHWC bf16 "
             "fp16, NCHW bf16 fp16 | NCHW / NHWC: fp32 bf16 fp16"]
    for r in res["records"]:
        h, x = r["half_speedup"], r["nchw_over_nhwc"]
        lines.append(f"  {str(tuple(r['shape_nhwc'])):20s} {r['mode']:9s} "
                     f"{r['ms']['NHWC float32']:8.2f} | "
                     f"{h['NHWC']['bfloat16']:.2f} {h['NHWC']['float16']:.2f}, "
                     f"{h['NCHW']['bfloat16']:.2f} {h['NCHW']['float16']:.2f} | "
                     + " ".join(f"{x[d]:.2f}" for d in DTYPES))
    for name, e in res["summary"].items():
        lines.append(f"  {name}: median {e['median']:.2f}x ({e['lowest']:.2f}x to "
                     f"{e['highest']:.2f}x), {e['goal']}: {e['meeting']} of {e['of']}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int)
    args = p.parse_args()
    print(table(run(quick=args.quick, rounds=args.rounds)))


if __name__ == "__main__":
    main()
