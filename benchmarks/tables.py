"""Markdown tables of the committed benchmark results, for README.md and docs/*.md.

A document marks each generated region with an HTML comment pair:

    <!-- table:NAME -->
    ...rendered from benchmarks/results/*.json...
    <!-- end table -->

    python benchmarks/tables.py --write   re-render every region (`make docs`; `make bench`
                                          runs it after a full run)
    python benchmarks/tables.py --check   exit 1 where a document differs from what the
                                          committed results give (tests/test_docs.py)

Every figure in the documents comes from here, so a figure no committed run backs cannot
stay: regenerate after each full `make bench` and commit results and documents together.
"""

import argparse
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
DOCUMENTS = ["README.md", "docs/performance.md", "docs/gpu.md", "docs/xla.md",
             "docs/distributed.md", "docs/export-and-convert.md", "docs/api.md",
             "docs/tuning.md"]
REGION = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- end table -->)", re.S)
ANCHOR_NAMES = {"fused_v3": "FusedBatchNormV3", "keras": "Keras layer",
                "composite": "tf.nn composite"}
MODE_NAMES = {"train_fwd": "training forward", "train_bwd": "training forward + backward",
              "infer": "inference"}


def load(name):
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def source(data, name):
    """The line under a table naming the run it comes from."""
    m = data.get("meta", {})
    tf_version = m.get("tensorflow") or data.get("tensorflow")
    parts = (m.get("cpu") or data.get("machine"),
             f"{m['cores']} cores" if m.get("cores") else None, f"TensorFlow {tf_version}")
    where = ", ".join(str(v) for v in parts if v)
    when = ", ".join(f"{k} {m[k]}" for k in ("commit", "date") if m.get(k))
    return f"\n_Source: `benchmarks/results/{name}` ({where}; {when or 'no commit recorded'})._\n"


def table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def shape(rec):
    return "(" + ",".join(str(d) for d in rec["shape"]) + ")"


def span(values, fmt="{:.2f}x"):
    values = sorted(values)
    if not values:
        return "n/a"
    lo, hi = fmt.format(values[0]), fmt.format(values[-1])
    return lo if lo == hi else f"{lo} to {hi}"


def flag(r):
    return "!" if r.get("agrees") is False else ""


def pct_dram(r):
    """% of the DRAM floor; results from before the cache floor call it pct_floor."""
    return r.get("pct_dram_floor", r.get("pct_floor"))


def pct(value):
    return f"{value:.0f}%" if value is not None else "n/a"


def tf_over_core(rec):
    return f"{rec['tf_over_core']:.2f}x" if "tf_over_core" in rec else "n/a"


def op_records(dtype=None, mode=None):
    data = load("op_bench.json")
    return data, [r for r in data["records"] if (dtype is None or r["dtype"] == dtype)
                  and (mode is None or r["mode"] == mode)]


# ---- the tables ------------------------------------------------------------------------


def op_float32_train():
    data, recs = op_records("float32", "train_bwd")
    rows = []
    for rec in recs:
        res = rec["results"]
        cells = [f"{shape(rec)} {rec['layout']}", f"{res['tfbn']['ms']:.1f} ms{flag(res['tfbn'])}"]
        for name in ("fused_v3", "keras"):
            r = res[name]
            cells.append(f"{r['ms']:.1f} ms{flag(r)} ({r['speedup']:.2f}x)" if "ms" in r
                         else "n/a")
        cells += [pct(pct_dram(res["tfbn"])), pct(res["tfbn"].get("pct_cache_floor")),
                  tf_over_core(rec)]
        rows.append(cells)
    head = ["shape", "tfbn", "FusedBatchNormV3 (tfbn's speed-up)", "Keras (speed-up)",
            "tfbn % of DRAM floor", "% of cache floor", "TF op / core"]
    return table(head, rows) + source(data, "op_bench.json")


def op_summary():
    data, recs = op_records()
    rows = []
    for dtype in dict.fromkeys(r["dtype"] for r in recs):
        for mode in MODE_NAMES:
            group = [r for r in recs if r["dtype"] == dtype and r["mode"] == mode]
            if not group:
                continue
            cells = [dtype, MODE_NAMES[mode]]
            for name in ("fused_v3", "keras", "composite"):
                ups = [r["results"][name]["speedup"] for r in group
                       if "speedup" in r["results"][name]]
                wrong = sum(r["results"][name].get("agrees") is False for r in group)
                cells.append(span(ups) + (f" ({wrong}!)" if wrong else ""))
            floors = [[f(r["results"]["tfbn"]) for r in group]
                      for f in (pct_dram, lambda r: r.get("pct_cache_floor"))]
            cells += [span([v for v in values if v is not None], "{:.0f}%") for values in floors]
            cells.append(span([r["tf_over_core"] for r in group if "tf_over_core" in r]))
            cells.append(span([r["in_graph_over_core"] for r in group
                               if "in_graph_over_core" in r]))
            rows.append(cells)
    head = ["dtype", "mode", "over FusedBatchNormV3", "over Keras", "over tf.nn composite",
            "tfbn % of DRAM floor", "% of cache floor", "TF op / core",
            "TF op in a graph / core"]
    return table(head, rows) + source(data, "op_bench.json")


def half_precision():
    data, recs = op_records()
    by_case = {(tuple(r["shape"]), r["axis"], r["mode"], r["dtype"]): r for r in recs}
    rows = []
    for dtype in ("float16", "bfloat16"):
        for mode in MODE_NAMES:
            ratios = [by_case[(s, a, m, "float32")]["results"]["tfbn"]["ms"]
                      / r["results"]["tfbn"]["ms"]
                      for (s, a, m, d), r in by_case.items()
                      if d == dtype and m == mode and (s, a, m, "float32") in by_case]
            if ratios:
                rows.append([dtype, MODE_NAMES[mode], span(ratios),
                             f"{statistics.median(ratios):.2f}x",
                             f"{sum(x < 1 for x in ratios)} of {len(ratios)}"])
    head = ["dtype", "mode", "float32 time / this dtype's time", "median", "slower than float32"]
    return table(head, rows) + source(data, "op_bench.json")


def not_yet(name):
    """What a table says where its results file has not been written yet."""
    return f"\n_No `benchmarks/results/{name}` yet: the next full `make bench` writes it._\n"


def side_by_side():
    if not os.path.exists(os.path.join(RESULTS, "side_by_side.json")):
        return not_yet("side_by_side.json")
    data = load("side_by_side.json")
    rows = []
    for r in data["records"]:
        h, x = r["half_speedup"], r["nchw_over_nhwc"]
        rows.append([str(tuple(r["shape_nhwc"])), MODE_NAMES[r["mode"]],
                     f"{r['ms']['NHWC float32']:.1f} ms",
                     f"{h['NHWC']['bfloat16']:.2f}x / {h['NHWC']['float16']:.2f}x",
                     f"{h['NCHW']['bfloat16']:.2f}x / {h['NCHW']['float16']:.2f}x",
                     " / ".join(f"{x[d]:.2f}x" for d in ("float32", "bfloat16", "float16"))])
    head = ["shape (NHWC)", "mode", "NHWC float32", "float32 / half, NHWC: bf16 / fp16",
            "float32 / half, NCHW: bf16 / fp16", "NCHW / NHWC: fp32 / bf16 / fp16"]
    lines = [f"{name}: median {e['median']:.2f}x, {e['lowest']:.2f}x to {e['highest']:.2f}x, "
             f"{e['goal']} in {e['meeting']} of {e['of']}" for name, e in data["summary"].items()]
    return (table(head, rows)
            + f"\nMedians over {data['rounds']} rounds of ratios taken within a round; each "
              f"time the median of {data['block']} back-to-back calls. "
            + "; ".join(lines) + ".\n"
            + source(data, "side_by_side.json"))


def memory():
    data, recs = op_records(mode="train_bwd")
    rows = []
    for dtype in dict.fromkeys(r["dtype"] for r in recs):
        group = [r for r in recs if r["dtype"] == dtype]
        cells = [dtype]
        for name in ("tfbn", "fused_v3", "keras"):
            ratios = [r["results"][name]["peak_mb"] * 2**20 / r["nbytes"] for r in group
                      if "peak_mb" in r["results"][name]]
            cells.append(span(ratios))
        rows.append(cells)
    head = ["dtype", "tfbn", "FusedBatchNormV3", "Keras"]
    return (table(head, rows) + "\nPeak bytes in TensorFlow's CPU allocator during one training "
            "forward + backward call, in multiples of bytes(x), over the shapes above.\n"
            + source(data, "op_bench.json"))


def overhead():
    data = load("overhead.json")
    shapes = data.get("shapes", [data])  # results before "shapes": (256, 64) only
    calls = list(shapes[0]["us_per_call"])
    rows = [[name] + [f"{rec['us_per_call'][name]:.0f} us" if name in rec["us_per_call"]
                      else "n/a" for rec in shapes] for name in calls]
    head = ["call"] + [f"{tuple(rec['shape'])}" for rec in shapes]
    return (table(head, rows)
            + f"\nTraining forward, {data['dtype']}, time per call: median of "
              f"{data['samples']} samples of {data['calls_per_sample']} calls. FusedBatchNormV3 "
              "takes an [N, C] tensor reshaped (once, outside the timed calls) to "
              "[N, 1, 1, C].\n"
            + source(data, "overhead.json"))


def settled(data):
    """How many warm-up calls tfbn took before a call without page faults (oneDNN off)."""
    calls = [r["results"]["tfbn"].get("settle_calls_off") for r in data["records"]]
    if not calls or not all(isinstance(v, int) for v in calls):
        return ""
    return (f"Timed after warm-up calls until one faulted in no page: tfbn with oneDNN off "
            f"took {min(calls)} to {max(calls)}. ")


def onednn():
    if not os.path.exists(os.path.join(RESULTS, "onednn.json")):
        return not_yet("onednn.json")
    data = load("onednn.json")
    rows = []
    for rec in data["records"]:
        cells = [f"{shape(rec)} {rec['layout']}", rec["dtype"], MODE_NAMES[rec["mode"]]]
        for name in ("tfbn", "fused_v3"):
            r = rec["results"][name]
            cells.append(f"{r['ms_off']:.1f} / {r['ms_on']:.1f} ms ({r['off_over_on']:.2f}x)"
                         if "ms_off" in r else "n/a")
            cells.append(f"{r['ms_off_bfc']:.1f} ms ({r['off_bfc_over_on']:.2f}x)"
                         if "ms_off_bfc" in r else "n/a")
            if name == "tfbn":
                cells.append(f"{r['page_faults_off']:.0f} / {r['page_faults_on']:.0f} / "
                             f"{r['page_faults_off_bfc']:.0f}"
                             if "page_faults_off_bfc" in r else "n/a")
        rows.append(cells)
    head = ["shape", "dtype", "mode", "tfbn: off / on (off over on)", "tfbn: off + BFC (over on)",
            "tfbn page faults per call: off / on / off + BFC",
            "FusedBatchNormV3: off / on (off over on)", "FusedBatchNormV3: off + BFC (over on)"]
    logged = data.get("onednn_logged_on", {})
    checked = (all(not v for v in logged.get("off", [True]))
               and all(not v for v in logged.get("off_bfc", [True]))
               and all(logged.get("on", [False])))
    return (table(head, rows)
            + f"\nMedian over {data['rounds']} rounds of one child process per setting, each "
              f"taking medians of {data['reps_per_child']} runs of each contender on its own; "
              "the settings alternate. off + BFC: oneDNN off with "
              "`TF_CPU_ALLOCATOR_USE_BFC=true`. Page faults: per call, median over the rounds. "
              + settled(data)
              + "TensorFlow's own log line "
              + ("confirms" if checked else "does not confirm")
              + " the setting in every child.\n"
            + source(data, "onednn.json"))


def e2e():
    data = load("e2e_digits.json")
    rows = [[name, f"{m['steps_per_s']:.1f}", f"{100 * m['val_accuracy']:.1f}%"]
            for name, m in data["models"].items()]
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in data.get("xla", {}).items()
                       if k != "accuracy_gap_points")
    text = table(["model (BatchNormalization)", "steps/s", "validation accuracy"], rows)
    text += (f"\ntfbn / Keras without XLA: {data['speedup']:.2f}x. With XLA: {ratios}.\n")
    if "op_under_xla" in data:
        o = data["op_under_xla"]
        text += (f"One BatchNorm under XLA, {tuple(o['shape'])} {o['dtype']} {o['mode']}: "
                 f"tfbn {o['median_ms']['tfbn']:.1f} ms, FusedBatchNormV3 "
                 f"{o['median_ms']['FusedBatchNormV3']:.1f} ms ({o['speedup_vs_fused_v3']:.2f}x), "
                 f"median of {o['reps']}.\n")
    return text + source(data, "e2e_digits.json")


def renorm_mask():
    data = load("renorm_mask.json")
    rows = []
    for rec in data["records"]:
        for option in ("renorm", "mask"):
            r = rec["results"][option]
            rows.append([str(tuple(rec["shape"])), option, f"{r['tfbn_ms']:.1f} ms",
                         f"{r['keras_ms']:.1f} ms", f"{r['speedup']:.2f}x",
                         f"{r['tfbn_vs_plain']:.2f}x / {r['keras_vs_plain']:.2f}x"])
    head = ["shape", "option", "tfbn", "Keras", "speed-up",
            "over the plain step: tfbn / Keras"]
    return table(head, rows) + source(data, "renorm_mask.json")


EPILOGUE_MODES = {"train_fwd_bwd": "training fwd + bwd", "infer": "inference",
                  "train_live": "training, live inputs"}


def epilogue():
    data = load("epilogue.json")
    rows, wrong = [], []
    for rec in data["records"]:
        res = rec["results"]
        cells = [str(tuple(rec["shape"])), EPILOGUE_MODES[rec["mode"]],
                 f"{res['fused']['ms']:.1f} ms{flag(res['fused'])}"]
        for name in ("tfbn+tf", "fbv3+tf"):
            r = res[name]
            cells.append(f"{r['ms']:.1f} ms{flag(r)} ({r['ratio_vs_fused']:.2f}x)")
            if r.get("agrees") is False:
                wrong.append(f"{name} {tuple(rec['shape'])} {rec['mode']}: "
                             f"{r['max_rel_error_vs_float64']:.1e}")
        rows.append(cells)
    head = ["shape", "mode", "fused", "tfbn BN + add + relu", "FusedBatchNormV3 + add + relu"]
    text = table(head, rows)
    if wrong:
        text += ("\n! wrong result: off from float64 math by more than float32 rounding "
                 "(largest error relative to the output's largest value): "
                 + "; ".join(wrong) + ".\n")
    if not any("agrees" in r for rec in data["records"] for r in rec["results"].values()):
        text += ("\nThis run predates the check against float64 math: nothing is flagged "
                 "here.\n")
    return text + source(data, "epilogue.json")


def distributed():
    data = load("distributed.json")
    rows = [[r["variant"], f"{r['steps_per_s']:.1f}", f"{r['bn_collectives_per_layer']:.0f}"]
            for r in data["results"]]
    return (table(["variant", "steps/s", "collectives per BatchNorm layer and step"], rows)
            + f"\n{data['strategy']}; {data['model']}; {data['statistic']}.\n"
            + source(data, "distributed.json"))


def gpu():
    data = load("gpu/bench_gpu.json")
    cases = {}
    for r in data["results"]:
        key = (r["channels"], r["spatial"])
        cases.setdefault(key, {"mb": None})
        if r["dtype"] == "float32":
            cases[key]["mb"] = r["megabytes"]
        layout = "NHWC" if r["layout"] == "channels_last" else "NCHW"
        short = {"float32": "fp32", "bfloat16": "bf16"}.get(r["dtype"], r["dtype"])
        cases[key][f"{short} {layout}"] = (f"{r['speedup_vs_torch']:.2f}x, "
                                           f"{r['tfbn_fraction_of_copy']:.2f}")
    cols = ["fp32 NHWC", "bf16 NHWC", "fp32 NCHW", "bf16 NCHW"]
    rows = [[f"{c} x {s}x{s}", f"{v['mb']:.0f}" if v["mb"] else "n/a"]
            + [v.get(col, "n/a") for col in cols] for (c, s), v in cases.items()]
    batch = data["results"][0]["batch"]
    return (table(["C x HW", "MB (fp32)"] + cols, rows)
            + f"\nTraining forward + backward at batch {batch}: speed-up over "
              "torch.nn.functional.batch_norm on the same layout, and tfbn's bytes moved per "
              "second as a fraction of a device-to-device copy's.\n"
            + f"\n_Source: `benchmarks/results/gpu/bench_gpu.json` ({data['device']}, PyTorch "
              f"{data['torch']})._\n")


def gpu_paths():
    """The GPU's split path and fused epilogue against the fused op and separate kernels."""
    data = load("gpu/bench_gpu.json")
    rows = []
    for r in data.get("split", []):
        lay = "NHWC" if r["layout"] == "channels_last" else "NCHW"
        rows.append(["split: stats, merge, apply; grad sums, grad apply",
                     f"{r['channels']} x {r['spatial']}x{r['spatial']}", r["dtype"], lay,
                     f"{r['us']['fused_fwd_bwd']:.0f}", f"{r['us']['split_fwd_bwd']:.0f}",
                     f"{r['ratio']['fwd_bwd']:.3f}"])
    for r in data.get("epilogue", []):
        rows.append([f"epilogue: {r['activation']}(BN(x) + residual)",
                     f"{r['channels']} x {r['spatial']}x{r['spatial']}", r["dtype"], "NHWC",
                     f"{r['us']['separate_fwd_bwd']:.0f}", f"{r['us']['fused_fwd_bwd']:.0f}",
                     f"{r['us']['fused_fwd_bwd'] / r['us']['separate_fwd_bwd']:.3f}"])
    batch = data["results"][0]["batch"]
    return (table(["path", "C x HW", "dtype", "layout", "reference us", "tfbn us",
                   "time ratio"], rows)
            + f"\nTraining forward + backward at batch {batch}. Split: the reference is the "
              "fused op on the same tensor (one part; the collective between the steps is not "
              "timed). Epilogue: the reference is the plain tfbn kernels followed by PyTorch's "
              "add and relu and their gradient (the same bytes a TensorFlow graph of the plain "
              "op and tf.add + tf.nn.relu moves). Below 1: tfbn's path is faster.\n"
            + f"\n_Source: `benchmarks/results/gpu/bench_gpu.json` ({data['device']}, PyTorch "
              f"{data['torch']})._\n")


def gpu_nvrtc():
    """The NVRTC build's kernels against the nvcc build's, one machine, one session."""
    data = load("gpu/nvrtc_vs_nvcc.json")
    m = data["summary"]
    return (f"Against the build before NVRTC (nvcc 13, static CUDA runtime), the same kernels "
            f"run at {m['min']:.3f}x to {m['max']:.3f}x of its time (median {m['median']:.3f}x "
            f"over the {m['cases']} cases of the benchmark, best of two alternating runs each).\n"
            f"\n_Source: `benchmarks/results/gpu/nvrtc_vs_nvcc.json` ({data['device']}, "
            f"PyTorch {data['torch']})._\n")


RESNET_NAMES = {"keras": "Keras BatchNormalization",
                "tfbn": "`tfbn.convert(model, fuse_epilogue=False)`",
                "tfbn_fused": "`tfbn.convert(model)` (fused tails)",
                "tfbn_fused (tfbn op)": "the same with `inference_op=\"tfbn\"`"}


def e2e_resnet():
    data = load("e2e_resnet.json")
    rows = []
    for name, label in RESNET_NAMES.items():
        cells = [label]
        for mode in ("train", "inference"):
            r = data[mode].get(name)
            ratio = 1.0 if name == "keras" else data[mode + "_speedup_vs_keras"].get(name)
            cells += ([f"{r['images_per_s']:.1f}", f"{ratio:.2f}x"] if r else ["", ""])
        rows.append(cells)
    fused = data["layers"]["tfbn_fused"]
    head = ["model", "training images/s", "vs Keras", "inference images/s", "vs Keras"]
    rounds = data["train"]["keras"]["rounds"]
    text = table(head, rows)
    text += (f"\n{data['model']}, input {tuple(data['input'])}, batch {data['batch_size']}, "
             f"{data['dtype']}: one `train_on_batch` (SGD) and one `predict_on_batch`, "
             f"median of {rounds} interleaved rounds. {fused['fused']} of "
             f"{fused['batch_norm_layers']} BatchNormalization layers carry the epilogue.\n")
    return text + source(data, "e2e_resnet.json")


def bn_after_conv():
    data = load("e2e_resnet.json")["bn_after_conv"]
    ms = data["median_ms"]
    rows = [[label] + [f"{ms[f'{tail}: {name}']:.1f} ms" for tail in ("relu", "add+relu")]
            for name, label in (("conv only", "nothing (the convolution, then the tail)"),
                                ("standard ops", "standard ops (FusedBatchNormV3, the default)"),
                                ("keras composite", "Keras' composite (`x * a + b`)"),
                                ("tfbn op", "tfbn's op (fused epilogue)"))]
    return (table([f"1x1 Conv2D on {tuple(data['shape'])}, then inference BN and", "relu",
                   "add + relu"], rows)
            + f"\nfloat32, median of {data['reps']} interleaved calls.\n"
            + source(load("e2e_resnet.json"), "e2e_resnet.json"))


def readme_status():
    _, train = op_records("float32", "train_bwd")
    up = lambda name: span([r["results"][name]["speedup"] for r in train  # noqa: E731
                            if "speedup" in r["results"][name]])
    floor = span([pct_dram(r["results"]["tfbn"]) for r in train], "{:.0f}%")
    g = load("gpu/bench_gpu.json")["results"]
    gpu_up = lambda dt, lay: span([r["speedup_vs_torch"] for r in g  # noqa: E731
                                   if r["dtype"] == dt and r["layout"] == lay])
    e = load("e2e_digits.json")
    r = load("e2e_resnet.json")
    xla = e.get("xla", {}).get("tfbn_xla / keras_xla")
    rows = [
        ["CPU", "every op, float16/bfloat16/float32/float64, any axis",
         f"float32 training step: {up('fused_v3')} over FusedBatchNormV3, {up('keras')} over "
         f"Keras; {floor} of the DRAM floor"],
        ["GPU (CUDA 12.5, sm_60 and up)", "every op: fused, epilogue, split family",
         f"fp32 NHWC {gpu_up('float32', 'channels_last')}, bf16 NHWC "
         f"{gpu_up('bfloat16', 'channels_last')} over PyTorch (kernels only)"],
        ["Keras models", "`tfbn.convert` of ResNet-50 (112x112, batch 16), CPU",
         f"training {r['train_speedup_vs_keras']['tfbn_fused']:.2f}x, inference "
         f"{r['inference_speedup_vs_keras']['tfbn_fused']:.2f}x over Keras' layer"],
        ["XLA", "every op, every dtype (`jit_compile=True`)",
         f"small CNN on CPU, both under XLA: {xla:.2f}x of Keras' layer" if xla else "n/a"],
    ]
    return (table(["where", "what runs", "headline speed-up"], rows)
            + "\n_From `benchmarks/results/` (op_bench.json, gpu/bench_gpu.json, "
              "e2e_resnet.json, e2e_digits.json); details in "
              "[docs/performance.md](docs/performance.md)._\n")


TABLES = {
    "op-float32-train": op_float32_train, "op-summary": op_summary,
    "half-precision": half_precision, "side-by-side": side_by_side, "memory": memory,
    "overhead": overhead, "e2e": e2e,
    "onednn": onednn,
    "renorm-mask": renorm_mask, "epilogue": epilogue, "distributed": distributed,
    "gpu": gpu, "gpu-paths": gpu_paths, "gpu-nvrtc": gpu_nvrtc,
    "readme-status": readme_status, "e2e-resnet": e2e_resnet,
    "bn-after-conv": bn_after_conv,
}


# ---- documents -------------------------------------------------------------------------


def render(text):
    """The document with every generated region re-rendered."""
    def region(m):
        name = m.group(2)
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
        return m.group(1) + TABLES[name]() + m.group(4)

    return REGION.sub(region, text)


def outside_regions(text):
    """The document's text outside its generated regions."""
    return REGION.sub("", text)


def stale_documents(write=False):
    """The documents whose tables differ from the results; rewritten where write is set."""
    stale = []
    for doc in DOCUMENTS:
        path = os.path.join(ROOT, doc)
        with open(path) as f:
            text = f.read()
        new = render(text)
        if new != text:
            stale.append(doc)
            if write:
                with open(path, "w") as f:
                    f.write(new)
    return stale


def write_documents():
    stale = stale_documents(write=True)
    return (f"re-rendered the tables of {', '.join(stale)}" if stale
            else "the documents' tables already match benchmarks/results")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true", help="re-render the documents in place")
    g.add_argument("--check", action="store_true", help="exit 1 where a document is stale")
    args = p.parse_args()
    if args.write:
        print(write_documents())
        return 0
    stale = stale_documents()
    print(f"stale: {', '.join(stale)}" if stale else "documents match benchmarks/results")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
