"""GPU benchmark: tfbn's CUDA kernels vs torch.nn.functional.batch_norm and a device copy.

ResNet-50's Batch Normalization shapes at batch 256, float32 and bfloat16, channels-last
(NHWC, tfbn axis=-1) and contiguous (NCHW, tfbn axis=1); training forward and backward.
Times are per call from CUDA events around back-to-back calls on one stream; the copy
(dst.copy_(src), same bytes as x) is measured in the same run as the yardstick.

Bandwidth: "moved" counts the bytes the two-pass kernels move (forward reads x twice and
writes y: 3N; backward reads dy and x twice and writes dx: 5N, N = bytes of x);
"ideal" counts what a single-pass kernel would move (2N and 3N). The copy moves 2N.

Then the fused epilogue relu(BN(x) + residual) on three shapes (float32, bfloat16,
channels-last) against the plain kernels followed by torch's add + relu: key "epilogue";
and the split path (statistics -> merge -> apply, gradient sums -> gradient apply) against
the fused op on the same tensor (split_bench.py): key "split".

Needs PyTorch with CUDA and tfbn._core built with CUDA (TFBN_CORE_PATH or installed tfbn);
no TensorFlow. Usage: python bench.py [--out DIR] [--quick]
"""

import argparse
import glob
import importlib.util
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from split_bench import run_split_cases  # this script's folder is on sys.path

# (channels, spatial size) of ResNet-50's BN layers (torchvision v1.5, 224x224 input).
RESNET50_BN = [
    (64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28),
    (256, 28), (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7),
]
BATCH = 256
EPS = 1e-5


def load_core():
    path = os.environ.get("TFBN_CORE_PATH")
    if not path:
        spec = importlib.util.find_spec("tfbn")
        if spec is None:
            sys.exit("bench: set TFBN_CORE_PATH to tfbn's _core*.so or install tfbn")
        path = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "_core.*")))[0]
    spec = importlib.util.spec_from_file_location("_core", path)
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    if not getattr(core, "cuda_built", False) or not core.cuda_available():
        sys.exit(f"bench: {path} has no usable CUDA (built={getattr(core, 'cuda_built', False)})")
    return core, path


def desc(t):
    """(data_ptr, shape, dtype): the per-call-cheap tensor form the module accepts."""
    return (t.data_ptr(), tuple(t.shape), str(t.dtype).replace("torch.", ""))


def time_per_call(fn, min_ms=30.0, warmup=3):
    """Mean seconds per call of fn over back-to-back calls, at least min_ms in total."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    iters = 1
    while True:
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        if ms >= min_ms or iters >= 1 << 14:
            return ms / iters / 1e3
        iters *= max(2, int(min_ms / max(ms, 1e-3)) + 1) if ms > 0 else 8


class Ours:
    def __init__(self, core, x, axis):
        self.core = core
        c = x.shape[axis]
        u = torch.float32
        dev = x.device
        self.axis = axis
        self.x = desc(x)
        self.y_t = torch.empty_like(x)
        self.dy_t = torch.randn_like(x)
        self.dx_t = torch.empty_like(x)
        self.y, self.dy, self.dx = desc(self.y_t), desc(self.dy_t), desc(self.dx_t)
        self.params = [torch.empty(c, dtype=u, device=dev) for _ in range(7)]
        self.params[0].uniform_(0.5, 1.5)
        self.params[1].normal_()
        (self.scale, self.offset, self.bm, self.bv, self.res, self.ds,
         self.do) = [desc(p) for p in self.params]
        shape, dtype = list(x.shape), self.x[2]
        fw = core.cuda_workspace_bytes(shape, dtype, axis=axis, training=True)
        bw = core.cuda_workspace_bytes(shape, dtype, axis=axis, backward=True)
        self.ws_t = torch.empty(max(fw, bw, 1), dtype=torch.uint8, device=dev)
        self.ws = desc(self.ws_t)
        self.stream = torch.cuda.current_stream().cuda_stream

    def forward(self):
        self.core.cuda_batch_norm_forward(
            self.x, self.scale, self.offset, y=self.y, batch_mean=self.bm,
            batch_variance=self.bv, mean_lo=self.res, axis=self.axis, epsilon=EPS,
            training=True, stream=self.stream, workspace=self.ws)

    def backward(self):
        self.core.cuda_batch_norm_backward(
            self.dy, self.x, self.scale, self.bm, self.bv, self.res, dx=self.dx,
            dscale=self.ds, doffset=self.do, axis=self.axis, epsilon=EPS, training=True,
            stream=self.stream, workspace=self.ws)


class Torch:
    """F.batch_norm's training path without autograd's per-call overhead: the aten ops it
    dispatches to (cuDNN or the native kernels, as PyTorch chooses), where available."""

    def __init__(self, x_nchw):
        c = x_nchw.shape[1]
        dev = x_nchw.device
        self.x = x_nchw
        self.w = torch.rand(c, device=dev) + 0.5
        self.b = torch.randn(c, device=dev)
        self.rm = torch.zeros(c, device=dev)
        self.rv = torch.ones(c, device=dev)
        self.dy = torch.randn_like(x_nchw)
        self.fused = hasattr(torch.ops.aten, "_batch_norm_with_update") and hasattr(
            torch.ops.aten, "batch_norm_backward")
        self.saved = None
        try:
            self.forward()
            self.backward()
        except (RuntimeError, TypeError):  # another signature: the public API instead
            self.fused = False
            self.forward()

    def forward(self):
        if self.fused:
            self.saved = torch.ops.aten._batch_norm_with_update(
                self.x, self.w, self.b, self.rm, self.rv, 0.1, EPS)
        else:
            self.saved = F.batch_norm(self.x, self.rm, self.rv, self.w, self.b, True, 0.1, EPS)

    def backward(self):
        if self.fused:
            _, mean, rstd, reserve = self.saved
            torch.ops.aten.batch_norm_backward(
                self.dy, self.x, self.w, self.rm, self.rv, mean, rstd, True, EPS,
                [True, True, True], reserve)
        else:  # autograd fallback: forward included
            x = self.x.detach().requires_grad_(True)
            F.batch_norm(x, self.rm, self.rv, self.w, self.b, True, 0.1, EPS).backward(self.dy)


def run_case(core, c, hw, dtype, layout, min_ms):
    dt = getattr(torch, dtype)
    x_nchw = torch.randn(BATCH, c, hw, hw, device="cuda", dtype=torch.float32).mul_(2).add_(1)
    x_nchw = x_nchw.to(dt)
    if layout == "channels_last":
        x_ours, axis = x_nchw.permute(0, 2, 3, 1).contiguous(), -1
        x_torch = x_nchw.contiguous(memory_format=torch.channels_last)
    else:
        x_ours, axis = x_nchw.contiguous(), 1
        x_torch = x_nchw.contiguous()
    del x_nchw
    nbytes = x_ours.numel() * x_ours.element_size()

    ours = Ours(core, x_ours, axis)
    t_of = time_per_call(ours.forward, min_ms)
    t_ob = time_per_call(ours.backward, min_ms)
    del ours
    ref = Torch(x_torch)
    t_tf = time_per_call(ref.forward, min_ms)
    t_tb = time_per_call(ref.backward, min_ms)
    fused = ref.fused
    if not fused:
        t_tb -= t_tf  # the fallback's backward includes a forward
    del ref
    src, dst = x_ours, torch.empty_like(x_ours)
    t_copy = time_per_call(lambda d=dst, s=src: d.copy_(s), min_ms)
    del src, dst, x_ours, x_torch

    gbs = lambda b, t: b / t / 1e9  # noqa: E731
    copy_bw = gbs(2 * nbytes, t_copy)
    ours_fb = t_of + t_ob
    torch_fb = t_tf + t_tb
    return {
        "channels": c, "spatial": hw, "batch": BATCH, "dtype": dtype, "layout": layout,
        "megabytes": nbytes / 2 ** 20,
        "us": {"tfbn_forward": t_of * 1e6, "tfbn_backward": t_ob * 1e6,
               "tfbn_fwd_bwd": ours_fb * 1e6, "torch_forward": t_tf * 1e6,
               "torch_backward": t_tb * 1e6, "torch_fwd_bwd": torch_fb * 1e6,
               "copy": t_copy * 1e6},
        "gbps": {"copy": copy_bw,
                 "tfbn_fwd_bwd_moved": gbs(8 * nbytes, ours_fb),
                 "tfbn_fwd_bwd_ideal": gbs(5 * nbytes, ours_fb),
                 "torch_fwd_bwd_ideal": gbs(5 * nbytes, torch_fb),
                 "tfbn_forward_moved": gbs(3 * nbytes, t_of),
                 "tfbn_backward_moved": gbs(5 * nbytes, t_ob)},
        "tfbn_fraction_of_copy": gbs(8 * nbytes, ours_fb) / copy_bw,
        "speedup_vs_torch": torch_fb / ours_fb,
        "torch_path": ("aten._batch_norm_with_update + aten.batch_norm_backward" if fused
                       else "F.batch_norm + autograd (backward = total - forward)"),
    }


# The fused epilogue y = relu(BN(x) + residual), channels-last, training forward + backward
# (with dresidual), against tfbn's plain BN followed by torch's add + relu and their
# backward (threshold_backward; the add passes dz through as dresidual).
EPILOGUE_SHAPES = [(256, 56), (512, 28), (1024, 14)]


class OursEpilogue(Ours):
    def __init__(self, core, x, axis):
        super().__init__(core, x, axis)
        self.r_t = torch.randn_like(x)
        self.dr_t = torch.empty_like(x)
        self.r, self.dr = desc(self.r_t), desc(self.dr_t)
        shape, dtype = list(x.shape), self.x[2]
        fw = core.cuda_workspace_bytes(shape, dtype, axis=axis, training=True, epilogue=True)
        bw = core.cuda_workspace_bytes(shape, dtype, axis=axis, backward=True, epilogue=True)
        self.ws_t = torch.empty(max(fw, bw, 1), dtype=torch.uint8, device=x.device)
        self.ws = desc(self.ws_t)

    def forward(self):
        self.core.cuda_batch_norm_forward(
            self.x, self.scale, self.offset, y=self.y, batch_mean=self.bm,
            batch_variance=self.bv, mean_lo=self.res, axis=self.axis, epsilon=EPS,
            training=True, stream=self.stream, workspace=self.ws, residual=self.r,
            activation="relu")

    def backward(self):
        self.core.cuda_batch_norm_backward(
            self.dy, self.x, self.scale, self.bm, self.bv, self.res, dx=self.dx,
            dscale=self.ds, doffset=self.do, axis=self.axis, epsilon=EPS, training=True,
            stream=self.stream, workspace=self.ws, offset=self.offset, residual=self.r,
            activation="relu", dresidual=self.dr)


class OursThenTorch(Ours):
    """tfbn's plain BN, then torch's add + relu (and their gradients) as separate kernels."""

    def __init__(self, core, x, axis):
        super().__init__(core, x, axis)
        self.r_t = torch.randn_like(x)
        self.z_t = torch.empty_like(x)
        self.out_t = torch.empty_like(x)
        self.dz_t = torch.randn_like(x)
        self.dz = desc(self.dz_t)

    def forward(self):
        super().forward()
        torch.add(self.y_t, self.r_t, out=self.z_t)
        torch.clamp_min(self.z_t, 0, out=self.out_t)

    def backward(self):
        self.dz_t = torch.ops.aten.threshold_backward(self.dy_t, self.out_t, 0)
        self.core.cuda_batch_norm_backward(
            desc(self.dz_t), self.x, self.scale, self.bm, self.bv, self.res, dx=self.dx,
            dscale=self.ds, doffset=self.do, axis=self.axis, epsilon=EPS, training=True,
            stream=self.stream, workspace=self.ws)


def run_epilogue_case(core, c, hw, dtype, min_ms):
    x = torch.randn(BATCH, hw, hw, c, device="cuda", dtype=torch.float32).mul_(2).add_(1)
    x = x.to(getattr(torch, dtype))
    times = {}
    for name, cls in (("fused", OursEpilogue), ("separate", OursThenTorch)):
        impl = cls(core, x, -1)
        times[name] = (time_per_call(impl.forward, min_ms), time_per_call(impl.backward, min_ms))
        del impl
    nbytes = x.numel() * x.element_size()
    del x
    fused, separate = sum(times["fused"]), sum(times["separate"])
    return {
        "channels": c, "spatial": hw, "batch": BATCH, "dtype": dtype, "layout": "channels_last",
        "activation": "relu", "residual": True, "megabytes": nbytes / 2 ** 20,
        "us": {"fused_forward": times["fused"][0] * 1e6,
               "fused_backward": times["fused"][1] * 1e6, "fused_fwd_bwd": fused * 1e6,
               "separate_forward": times["separate"][0] * 1e6,
               "separate_backward": times["separate"][1] * 1e6,
               "separate_fwd_bwd": separate * 1e6},
        "speedup": separate / fused,
        "separate_path": "tfbn BN + torch.add + torch.clamp_min; aten.threshold_backward + "
                         "tfbn BN backward",
    }


def run_epilogue(core, min_ms):
    print(f"epilogue relu(BN(x) + residual), channels_last:\n{'C':>5} {'HW':>4} {'dtype':>8} "
          f"{'MB':>7} | {'fused f+b us':>12} {'separate us':>11} {'speedup':>7}", flush=True)
    results = []
    for dtype in ("float32", "bfloat16"):
        for c, hw in EPILOGUE_SHAPES:
            try:
                r = run_epilogue_case(core, c, hw, dtype, min_ms)
            except (RuntimeError, ValueError) as e:
                print(f"{c:>5} {hw:>4} {dtype:>8} FAILED: {e}", flush=True)
                continue
            results.append(r)
            print(f"{c:>5} {hw:>4} {dtype:>8} {r['megabytes']:>7.1f} | "
                  f"{r['us']['fused_fwd_bwd']:>12.1f} {r['us']['separate_fwd_bwd']:>11.1f} "
                  f"{r['speedup']:>7.2f}", flush=True)
    return results


# (channels, spatial, dtype, layout) of the cases whose kernels --profile times one by one
PROFILE_CASES = [(64, 112, "bfloat16", "channels_last"), (128, 28, "float32", "channels_last"),
                 (1024, 14, "bfloat16", "contiguous"), (2048, 7, "float32", "contiguous")]


def profile_kernels(core, c, hw, dtype, layout, calls=5, impl=None):
    """Per-kernel device time of tfbn's forward and backward (torch.profiler, CUPTI); impl:
    the class that runs them (Ours, or OursEpilogue for the epilogue)."""
    from torch.profiler import ProfilerActivity, profile
    dt = getattr(torch, dtype)
    shape = (BATCH, hw, hw, c) if layout == "channels_last" else (BATCH, c, hw, hw)
    x = torch.randn(shape, device="cuda", dtype=torch.float32).to(dt)
    ours = (impl or Ours)(core, x, -1 if layout == "channels_last" else 1)
    ours.forward()
    ours.backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            ours.forward()
            ours.backward()
        torch.cuda.synchronize()
    mb = x.numel() * x.element_size() / 1e6
    what = "" if impl is None else f" ({impl.__name__})"
    print(f"kernels{what} of {c}x{hw} {dtype} {layout} ({mb:.0f} MB), us per call:", flush=True)
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if total and e.count:
            name = e.key.split("(")[0].split("<")[0].split("::")[-1]
            args = e.key[e.key.find("<"):e.key.find(">(") + 1][:70] if "<" in e.key else ""
            print(f"  {total / calls:9.1f}  x{e.count // calls}  {name} {args}", flush=True)


def write(out_dir, core, path, results, started, final=False, epilogue=None, split=None):
    big = [r for r in results if r["megabytes"] >= 64]
    summary = {
        "cases": len(results),
        "complete": final,
        "cases_at_least_64MB": len(big),
        "min_fraction_of_copy_64MB": min((r["tfbn_fraction_of_copy"] for r in big), default=None),
        "min_speedup_vs_torch_channels_last_64MB": min(
            (r["speedup_vs_torch"] for r in big if r["layout"] == "channels_last"), default=None),
        "seconds": time.time() - started,
    }
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "bench_gpu.json")
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "torch_cuda": torch.version.cuda, "tfbn_core": path,
                   "cuda_compiler": core.cuda_compiler_version(),
                   "cuda_images": core.cuda_architectures(),
                   "cuda_image_compression": getattr(core, "cuda_image_compression",
                                                     lambda: "none")(),
                   "cuda_driver": core.cuda_driver_version(), "python": platform.python_version(),
                   "summary": summary, "results": results, "epilogue": epilogue or [],
                   "split": split or []},
                  f, indent=1)
    if final:
        print("summary:", json.dumps(summary), flush=True)
        print("wrote", out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="4 shapes, shorter timings")
    parser.add_argument("--min-ms", type=float, default=25.0)
    parser.add_argument("--profile", action="store_true",
                        help="also time each kernel of a few cases (torch.profiler)")
    args = parser.parse_args()
    core, path = load_core()
    shapes = RESNET50_BN[::3] if args.quick else RESNET50_BN
    min_ms = 10.0 if args.quick else args.min_ms
    torch.backends.cudnn.benchmark = True
    results, failures = [], 0
    header = (f"{'C':>5} {'HW':>4} {'dtype':>8} {'layout':>13} {'MB':>7} | "
              f"{'tfbn f+b us':>11} {'torch f+b us':>12} {'speedup':>7} | "
              f"{'moved GB/s':>10} {'copy GB/s':>9} {'of copy':>7}")
    print(f"tfbn {path}\ntorch {torch.__version__} CUDA {torch.version.cuda} on "
          f"{torch.cuda.get_device_name()}\n{header}", flush=True)
    started = time.time()
    for dtype in ("float32", "bfloat16"):
        for layout in ("channels_last", "contiguous"):
            for c, hw in shapes:
                try:
                    r = run_case(core, c, hw, dtype, layout, min_ms)
                except (RuntimeError, ValueError) as e:  # report and go on to the next case
                    print(f"{c:>5} {hw:>4} {dtype:>8} {layout:>13} FAILED: {e}", flush=True)
                    failures += 1
                    continue
                results.append(r)
                print(f"{c:>5} {hw:>4} {dtype:>8} {layout:>13} {r['megabytes']:>7.1f} | "
                      f"{r['us']['tfbn_fwd_bwd']:>11.1f} {r['us']['torch_fwd_bwd']:>12.1f} "
                      f"{r['speedup_vs_torch']:>7.2f} | {r['gbps']['tfbn_fwd_bwd_moved']:>10.0f} "
                      f"{r['gbps']['copy']:>9.0f} {r['tfbn_fraction_of_copy']:>7.2f}", flush=True)
                write(args.out, core, path, results, started)  # kept if the run is cut short
    epilogue = run_epilogue(core, 10.0)
    if len(epilogue) < 2 * len(EPILOGUE_SHAPES):
        failures += 2 * len(EPILOGUE_SHAPES) - len(epilogue)
    try:
        split = run_split_cases(core, torch, time_per_call, desc, 10.0, BATCH)
    except (RuntimeError, ValueError) as e:  # report it and keep the other results
        print(f"split path FAILED: {e}", flush=True)
        split, failures = [], failures + 1
    write(args.out, core, path, results, started, final=True, epilogue=epilogue, split=split)
    if args.profile:
        for case, impl in [(case, None) for case in PROFILE_CASES] + [
                ((512, 28, dtype, "channels_last"), OursEpilogue)
                for dtype in ("float32", "bfloat16")]:
            try:
                profile_kernels(core, *case, impl=impl)
            except Exception as e:  # noqa: BLE001 -- a profiler that cannot run is no failure
                print(f"profile {case}: {type(e).__name__}: {e}", flush=True)
    if failures:
        sys.exit(f"bench: {failures} case(s) failed")


if __name__ == "__main__":
    main()
