"""tfbn with TensorFlow's oneDNN optimizations off and on (TF_ENABLE_ONEDNN_OPTS=0 / 1).

TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at import, so each setting runs in a child
process of its own: `python benchmarks/onednn.py --child ...` times tfbn (and, for
reference, FusedBatchNormV3, which oneDNN replaces when on) in train_fwd and train_bwd on
each case, each contender on its own (see child()), after warm-up calls until one touches
no fresh memory (settle_calls), and prints one JSON line of medians. The parent
alternates the two settings over several rounds (the first setting swaps each round) so
that a noisy machine's slow spells spread over both, and reports per case and contender
the median over the rounds of the children's medians per setting and off / on.

    python benchmarks/onednn.py [--quick] [--rounds R] [--reps N] [--out FILE]

or `python benchmarks/run.py --only onednn` (results/onednn[-quick].json).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# (shape, axis, layout); the ResNet-50 shapes of the issue
CASES = [((32, 56, 56, 64), -1, "NHWC"), ((32, 28, 28, 512), -1, "NHWC"),
         ((32, 64, 56, 56), 1, "NCHW")]
QUICK_CASES = CASES[:1]
DTYPES = ("float32", "bfloat16")
MODES = ("train_fwd", "train_bwd")
CONTENDERS = ("tfbn", "fused_v3")
# TF_ENABLE_ONEDNN_OPTS off, on, and off with TensorFlow's caching (BFC) CPU allocator, which
# oneDNN brings along when on: what a user who turns oneDNN off can set to keep op outputs
# from being fresh, zero-filled pages on every call.
SETTINGS = ("0", "1", "0b")
SETTING_NAMES = {"0": "off", "1": "on", "0b": "off_bfc"}
ONEDNN_ON_LOG = "oneDNN custom operations are on"


# ---- child: one setting, every case ----------------------------------------------------


def child(cases, dtypes, reps):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")  # keep TensorFlow's oneDNN log line
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    import contenders
    import op_bench
    from timing import median_ms, round_robin

    builders = {"tfbn": contenders.tfbn_op, "fused_v3": contenders.fused_v3}
    records = []
    for shape, axis, layout in cases:
        case = op_bench.Case(tuple(shape), axis, layout)
        for dtype in dtypes:
            inputs = op_bench.make_inputs(case, dtype)
            for mode in MODES:
                fns, ms = {}, {}
                for name in CONTENDERS:
                    try:
                        fns[name] = builders[name](case, mode, inputs)
                        fns[name]()  # traces
                    except (tf.errors.OpError, ValueError, TypeError,
                            NotImplementedError, contenders.NotApplicable) as err:
                        fns.pop(name, None)
                        ms[name] = {"na": f"{type(err).__name__}: "
                                          f"{str(err).splitlines()[0][:160]}"}
                # Each contender on its own, tfbn first: interleaved, tfbn's time would
                # depend on how much of the cache the FusedBatchNormV3 call before it had
                # evicted, and that differs between the settings (without oneDNN, the NCHW
                # one takes 3x longer and moves several times the bytes).
                settle, faults = {}, {}
                for name, fn in fns.items():
                    settle[name] = settle_calls(fn)
                    ms[name] = median_ms(round_robin({name: fn}, reps, reps, budget_s=0.0)[0][name])
                    faults[name] = page_faults(fn)
                records.append({"shape": list(shape), "axis": axis, "layout": layout,
                                "dtype": dtype, "mode": mode, "ms": ms,
                                "settle": settle.get("tfbn", 0), "faults": faults})
            del inputs
    return records


# Calls before timing: at most this many, until a call faults in no page.
MAX_SETTLE_CALLS = 40


def settle_calls(fn):
    """Calls fn until a call touches no fresh page (at most MAX_SETTLE_CALLS calls);
    returns the calls taken.

    Without oneDNN, TensorFlow's CPU allocator is glibc's malloc: for the first few calls
    of a new shape, outputs of this size come from fresh mmap'd memory (the allocator's
    thresholds adapt), then from memory reused call after call. A training loop runs the
    same shapes thousands of times, so the steady state is what is timed; how many calls
    it takes to get there is reported beside it."""
    for r in range(1, MAX_SETTLE_CALLS + 1):
        if page_faults(fn, calls=1) == 0:
            return r
    return MAX_SETTLE_CALLS


def page_faults(fn, calls=5):
    """Minor page faults per call of fn (first touches of fresh memory), after the timing."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


# ---- parent: alternate the settings ----------------------------------------------------


def _run_child(setting, cases, dtypes, reps):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=setting[0], TF_CPP_MIN_LOG_LEVEL="0")
    env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
    if setting == "0b":
        env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    command = [sys.executable, os.path.abspath(__file__), "--child", "--reps", str(reps),
               "--cases", json.dumps(cases), "--dtypes", *dtypes]
    proc = subprocess.run(command, env=env, cwd=HERE, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TF_ENABLE_ONEDNN_OPTS={setting} child failed:\n"
                           + proc.stderr[-3000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["records"], ONEDNN_ON_LOG in proc.stderr


def run(quick=False, rounds=None, reps=None, dtypes=None, log=sys.stderr):
    cases = [list(c) for c in (QUICK_CASES if quick else CASES)]
    dtypes = list(dtypes or (["float32"] if quick else DTYPES))
    rounds = rounds or (2 if quick else 5)
    reps = reps or (5 if quick else 10)
    runs = {s: [] for s in SETTINGS}
    log_says_on = {s: [] for s in SETTINGS}
    for r in range(rounds):
        for setting in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
            records, on = _run_child(setting, cases, dtypes, reps)
            runs[setting].append(records)
            log_says_on[setting].append(on)
            print(f"  round {r + 1}/{rounds}, oneDNN {SETTING_NAMES[setting]}: "
                  f"TensorFlow logged oneDNN {'on' if on else 'off'}", file=log, flush=True)
    out = []
    for i, base in enumerate(runs[SETTINGS[0]][0]):
        rec = {k: base[k] for k in ("shape", "axis", "layout", "dtype", "mode")}
        rec["results"] = {}
        for name in CONTENDERS:
            per = {s: [rs[i]["ms"][name] for rs in runs[s]] for s in SETTINGS}
            if any(not isinstance(v, float) for vals in per.values() for v in vals):
                na = next(v["na"] for vals in per.values() for v in vals
                          if not isinstance(v, float))
                rec["results"][name] = {"na": na}
                continue
            off, on, off_bfc = (statistics.median(per[s]) for s in SETTINGS)
            faults = {s: statistics.median(rs[i]["faults"][name] for rs in runs[s])
                      for s in SETTINGS}
            settle = {s: max(rs[i]["settle"] for rs in runs[s]) for s in SETTINGS}
            rec["results"][name] = {"ms_off": off, "ms_on": on, "off_over_on": off / on,
                                    "ms_off_bfc": off_bfc, "off_bfc_over_on": off_bfc / on,
                                    "rounds_ms_off": per["0"], "rounds_ms_on": per["1"],
                                    "rounds_ms_off_bfc": per["0b"],
                                    "page_faults_off": faults["0"],
                                    "page_faults_on": faults["1"],
                                    "page_faults_off_bfc": faults["0b"],
                                    "settle_calls_off": settle["0"],
                                    "settle_calls_on": settle["1"],
                                    "settle_calls_off_bfc": settle["0b"]}
        out.append(rec)
    ratios = [r["results"]["tfbn"]["off_over_on"] for r in out
              if "off_over_on" in r["results"]["tfbn"]]
    return {
        "rounds": rounds, "reps_per_child": reps, "settings": {"off": "0", "on": "1",
                     "off_bfc": "0 with TF_CPU_ALLOCATOR_USE_BFC=true"},
        "onednn_logged_on": {SETTING_NAMES[s]: v for s, v in log_says_on.items()},
        "records": out,
        "tfbn_max_deviation": max(abs(x - 1.0) for x in ratios) if ratios else None,
    }


def table(res):
    lines = ["", f"tfbn with oneDNN off / on (TF_ENABLE_ONEDNN_OPTS=0 / 1): median ms over "
                 f"{res['rounds']} rounds of children each taking medians of "
                 f"{res['reps_per_child']} runs",
             f"{'shape':18s} {'layout':6s} {'dtype':8s} {'mode':9s} |"
             + "".join(f" {n + ' off':>12s} {n + ' on':>12s} {'off/on':>6s} {'+BFC':>6s} |"
                       for n in CONTENDERS)]
    for rec in res["records"]:
        row = (f"{str(tuple(rec['shape'])):18s} {rec['layout']:6s} {rec['dtype']:8s} "
               f"{rec['mode']:9s} |")
        for name in CONTENDERS:
            r = rec["results"][name]
            row += (f" {r['ms_off']:12.2f} {r['ms_on']:12.2f} {r['off_over_on']:6.2f}"
                    f" {r['off_bfc_over_on']:6.2f} |"
                    if "ms_off" in r else f" {'n/a':>12s} {'n/a':>12s} {'':6s} {'':6s} |")
        lines.append(row)
    logged = res["onednn_logged_on"]
    lines.append(f"  TensorFlow logged oneDNN on: off children {logged['off']}, "
                 f"on children {logged['on']}, off+BFC children {logged['off_bfc']}")
    lines.append("  +BFC: off with TF_CPU_ALLOCATOR_USE_BFC=true, over on")
    settle = [r["results"]["tfbn"].get("settle_calls_off") for r in res["records"]]
    if all(isinstance(v, int) for v in settle):
        lines.append(f"  timed after warm-up calls until one faulted in no page: tfbn with "
                     f"oneDNN off took {min(settle)} to {max(settle)} calls to get there "
                     f"(at most {MAX_SETTLE_CALLS})")
    if res["tfbn_max_deviation"] is not None:
        lines.append(f"  tfbn off/on furthest from 1: {100 * res['tfbn_max_deviation']:.1f}% "
                     "(target: within 10%)")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--dtypes", nargs="+")
    p.add_argument("--out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cases", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        records = child(json.loads(args.cases), args.dtypes, args.reps)
        print(json.dumps({"records": records}))
        return 0
    res = run(quick=args.quick, rounds=args.rounds, reps=args.reps, dtypes=args.dtypes)
    print(table(res))
    if args.out:
        import report

        report.write_json(args.out, {"quick": args.quick}, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
