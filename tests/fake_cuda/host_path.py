"""Drives tfbn._core's CUDA entry points against the fake driver (fake_libcuda.c) and prints
what happened as JSON. Run by tests/test_cuda_host_path.py in a child process whose
LD_LIBRARY_PATH starts with the fake libcuda.so.1:

    python host_path.py CORE_PATH FAKE_LIBCUDA SCENARIO

Device tensors are (data_ptr, shape, dtype) tuples over host memory: the kernels never run,
so only the host side is exercised: argument checks, launch plans, kernel names, the
driver calls.
"""

import ctypes
import importlib.util
import json
import sys
import threading

import numpy as np

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
ACTIVATIONS = ["identity", "relu", "relu6", "silu"]
# (shape, axis): channels-last and planar, whole 16-byte vectors or not, small and large
# planes, and rank 2.
LAYOUTS = [
    ((4, 5, 5, 3), -1),
    ((4, 5, 5, 8), -1),
    ((2, 3, 3, 1000), -1),
    ((256, 64), -1),
    ((64, 3), 0),
    ((4, 8, 7, 7), 1),
    ((2, 16, 4, 4), 1),
    ((2, 64, 56, 56), 1),
    ((3, 3, 1, 1), 1),
    ((2, 6, 14, 14), 1),  # inner 196: 16-bit loads of 4 elements
    ((4, 10, 6), 1),  # inner 6: loads of 2 elements; groups across planes
    ((3, 5, 10), 1),
    # large planes: a block's share of a channel for 256 threads, at each load width
    ((64, 64, 128, 128), 1),
    ((65536, 16, 2, 98), 1),
    ((32768, 16, 5, 50), 1),
    ((1024, 16, 75, 75), 1),
    ((1024, 256, 256), -1),
]
STREAM = 0x5000  # any handle the fake takes as a stream of its one context


class Memory:
    """Device addresses that nothing reads (the kernels do not run, and the host never
    touches device memory): 256-byte aligned like cudaMalloc's, or `offset` bytes past
    that, from a range no host memory uses."""

    def __init__(self, offset=0):
        self.next = 1 << 44
        self.offset = offset

    def tensor(self, shape, dtype):
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        address = self.next + self.offset
        self.next += (nbytes + self.offset + 511) // 256 * 256
        return (address, tuple(shape), dtype)


def load(core_path, fake_path):
    spec = importlib.util.spec_from_file_location("_core", core_path)
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    fake = ctypes.CDLL(fake_path)
    fake.fake_cuda_launch.restype = ctypes.c_char_p
    fake.fake_cuda_last_error.restype = ctypes.c_char_p
    fake.fake_cuda_loaded_image.restype = ctypes.c_char_p
    return core, fake


def every_entry_point(core, mem, dtype, shape, axis, stream=STREAM):
    """Calls each CUDA entry point once per mode; yields (case, exception or None)."""
    rank = len(shape)
    c = shape[axis]
    u = "float64" if dtype == "float64" else "float32"
    x = mem.tensor(shape, dtype)

    def like():
        return mem.tensor(shape, dtype)

    def vec():
        return mem.tensor((c,), u)

    positions = tuple(d for i, d in enumerate(shape) if i != axis % rank)

    def call(case, fn, *args, **kwargs):
        try:
            fn(*args, stream=stream, **kwargs)
            return case, None
        except Exception as e:  # noqa: BLE001 (reported with the case)
            return case, e

    for training in (True, False):
        stats = {} if training else {"mean": vec(), "variance": vec()}
        yield call(f"forward training={training}", core.cuda_batch_norm_forward, x, vec(), vec(),
                   y=like(), batch_mean=vec(), batch_variance=vec(), mean_lo=vec(), axis=axis,
                   training=training, **stats)
        yield call(f"backward training={training}", core.cuda_batch_norm_backward, like(), x,
                   vec(), vec(), vec(), vec(), dx=like(), dscale=vec(), doffset=vec(), axis=axis,
                   training=training)
        for act in ACTIVATIONS:
            for residual in (None, like()):
                tag = f"{act} residual={residual is not None} training={training}"
                yield call(f"epilogue forward {tag}", core.cuda_batch_norm_forward, x, vec(),
                           vec(), y=like(), batch_mean=vec(), batch_variance=vec(),
                           mean_lo=vec(), axis=axis, training=training, residual=residual,
                           activation=act, **stats)
                yield call(f"epilogue backward {tag}", core.cuda_batch_norm_backward, like(), x,
                           vec(), vec(), vec(), vec(), dx=like(), dscale=vec(), doffset=vec(),
                           axis=axis, training=training, offset=vec(), residual=residual,
                           activation=act, dresidual=like() if residual is not None else None)
    for weights in (None, mem.tensor(positions, "float32")):
        w = weights is not None
        yield call(f"partial_moments weights={w}", core.cuda_partial_moments, x, weights,
                   partial=mem.tensor((3, c), "float64"), axis=axis)
        for rows in (2, 4):
            yield call(f"apply_grad_with_sums weights={w} rows={rows}",
                       core.cuda_apply_grad_with_sums, like(), x, vec(), vec(), vec(), vec(),
                       mem.tensor((2, c), "float64"), mem.tensor((rows, c), "float64"),
                       mem.tensor((c,), "float64"), weights, dx=like(), dscale=vec(),
                       doffset=vec(), axis=axis)
    yield call("merge_moments", core.cuda_merge_moments, mem.tensor((2, 3, c), "float64"),
               mean=vec(), variance=vec(), mean_lo=vec(), count=mem.tensor((c,), "float64"))
    yield call("apply_statistics", core.cuda_apply_statistics, x, vec(), vec(), vec(), vec(),
               vec(), y=like(), axis=axis)
    yield call("grad_sums", core.cuda_grad_sums, like(), x, vec(), vec(),
               sums=mem.tensor((2, c), "float64"), axis=axis)


def launches(fake):
    out = []
    for i in range(fake.fake_cuda_launch_count()):
        name, grid, block, shared, args, params = fake.fake_cuda_launch(i).decode().split("|")
        out.append({"kernel": name, "grid": grid, "block": block, "shared": int(shared),
                    "args": int(args), "params": int(params)})
    return out


def scenario_matrix(core, fake):
    """Every entry point, dtype and layout; each must launch, or fail with an error only
    where the fake driver refused a launch (which the test then reports)."""
    errors, calls = [], 0
    for dtype in ITEMSIZE:
        # offset: data not 16-byte aligned, which the vector paths need
        for (shape, axis), offset in [(layout, 0) for layout in LAYOUTS] + [
                (LAYOUTS[1], ITEMSIZE[dtype]), (LAYOUTS[6], ITEMSIZE[dtype])]:
            mem = Memory(offset)
            for case, error in every_entry_point(core, mem, dtype, shape, axis):
                calls += 1
                if error is not None:
                    errors.append(f"{dtype} {shape} axis={axis} offset={offset} {case}: {error}")
    return {"calls": calls, "errors": errors, "launches": launches(fake),
            "module_loads": fake.fake_cuda_module_loads(),
            "function_lookups": fake.fake_cuda_function_lookups(),
            "allocations_outstanding": fake.fake_cuda_allocations(),
            "image": fake.fake_cuda_loaded_image().decode(),
            "image_kernels": fake.fake_cuda_image_kernels(),
            "architectures": core.cuda_architectures().split()}


def forward(core, mem, stream=STREAM, shape=(4, 5, 5, 8), dtype="float32"):
    c = shape[-1]

    def vec():
        return mem.tensor((c,), "float32")

    core.cuda_batch_norm_forward(mem.tensor(shape, dtype), vec(), vec(),
                                 y=mem.tensor(shape, dtype), batch_mean=vec(),
                                 batch_variance=vec(), mean_lo=vec(), stream=stream)


def error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (the message is what is checked)
        return f"{type(e).__name__}: {e}"
    return None


def scenario_lifecycle(core, fake):
    """Module loading per context, errors and their messages."""
    mem = Memory()
    out = {}
    forward(core, mem)
    out["after_first"] = [fake.fake_cuda_module_loads(), fake.fake_cuda_function_lookups()]
    forward(core, mem, shape=(2, 16, 16, 32), dtype="bfloat16")
    out["after_second"] = [fake.fake_cuda_module_loads(), fake.fake_cuda_function_lookups()]
    fake.fake_cuda_recreate_context()
    forward(core, mem)
    out["after_new_context"] = [fake.fake_cuda_module_loads(), fake.fake_cuda_function_lookups()]
    out["dead_stream"] = error_of(lambda: forward(core, mem, stream=0xDEAD))
    out["default_stream_no_context"] = error_of(lambda: forward(core, mem, stream=0))
    # then a failure of the launcher's own (no driver call fails): the detail of the
    # failures above must not be carried into its message. 2^31 channels, more than the
    # merge kernel takes; nothing is read, so the tensors need no memory.
    c = 1 << 31
    out["launcher_refusal"] = error_of(lambda: core.cuda_merge_moments(
        (256, (1, 3, c), "float64"), mean=(256, (c,), "float32"), variance=(256, (c,), "float32"),
        mean_lo=(256, (c,), "float32"), count=(256, (c,), "float64"), stream=STREAM))
    out["allocations_outstanding"] = fake.fake_cuda_allocations()
    return out


def scenario_image(core, fake):
    """Which image the device's compute capability (FAKE_CUDA_CC) gets, or the error."""
    mem = Memory()
    error = error_of(lambda: forward(core, mem))
    return {"error": error, "image": fake.fake_cuda_loaded_image().decode(),
            "launches": fake.fake_cuda_launch_count()}


def scenario_threads(core, fake):
    """Eight threads launching at once into one context that none has loaded yet."""
    errors = []
    start = threading.Barrier(8)

    def work(i):
        mem = Memory()
        start.wait()
        for k in range(20):
            shape = (2, 3, 3, 8 * (1 + (i + k) % 5))
            dtype = ["float32", "bfloat16", "float16"][k % 3]
            error = error_of(lambda: forward(core, mem, shape=shape, dtype=dtype))  # noqa: B023
            if error:
                errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"errors": errors, "module_loads": fake.fake_cuda_module_loads(),
            "launches": fake.fake_cuda_launch_count(),
            "allocations_outstanding": fake.fake_cuda_allocations()}


def main():
    core_path, fake_path, scenario = sys.argv[1:4]
    core, fake = load(core_path, fake_path)
    assert core.cuda_available(), "the fake driver was not the one opened"
    result = globals()[f"scenario_{scenario}"](core, fake)
    result["last_error"] = fake.fake_cuda_last_error().decode()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
