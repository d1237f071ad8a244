"""Every tfbn op has a GPU kernel for each dtype pair its CPU kernels run, and for every
attribute value (activation, residual): checked in TensorFlow's kernel registry, so on any
machine, GPU or not. A missing GPU kernel would not fail: TensorFlow would quietly place the
op on the CPU, with a copy of its tensors each way. Skips for a CPU-only build
(-DTFBN_CUDA=OFF), which registers no GPU kernel."""

import itertools

import pytest
from tensorflow.python.framework import kernels

import tfbn

pytestmark = pytest.mark.skipif(not tfbn.build_info()["cuda"],
                                reason="tfbn was built without CUDA")

TYPE_ATTRS = ("T", "U")
HALF_AND_FLOAT = {"DT_HALF", "DT_BFLOAT16", "DT_FLOAT"}


def type_name(enum_value):
    from tensorflow.core.framework import types_pb2

    return types_pb2.DataType.Name(enum_value)


def registered(device):
    """{op: {(T, U): unrestricted}} for the tfbn kernels on `device`; T or U is None where
    the op has no such attribute. A kernel is restricted when it constrains anything but
    T and U (an attribute value) or carries a label."""
    found = {}
    for k in kernels.get_all_registered_kernels().kernel:
        if not k.op.startswith("Tfbn") or k.device_type != device:
            continue
        types = {name: [None] for name in TYPE_ATTRS}
        restricted = bool(k.label)
        for c in k.constraint:
            if c.name in TYPE_ATTRS:
                types[c.name] = [type_name(t) for t in c.allowed_values.list.type]
            else:
                restricted = True
        ops = found.setdefault(k.op, {})
        for pair in itertools.product(*(types[name] for name in TYPE_ATTRS)):
            ops[pair] = ops.get(pair, False) or not restricted
    return found


def mismatched(pair):
    """The (T, U) pairs whose CPU kernels only report the dtypes (no GPU kernel needed)."""
    t, u = pair
    return (t in HALF_AND_FLOAT and u == "DT_DOUBLE") or (t == "DT_DOUBLE" and u == "DT_FLOAT")


def test_every_cpu_kernel_has_an_unrestricted_gpu_kernel():
    cpu, gpu = registered("CPU"), registered("GPU")
    # The fused op and its gradient, and the split family's five ops.
    assert len(cpu) == 7, sorted(cpu)
    missing = [(op, t, u) for op, pairs in sorted(cpu.items()) for (t, u) in sorted(
        pairs, key=str) if not mismatched((t, u)) and not gpu.get(op, {}).get((t, u))]
    assert not missing, "no unrestricted GPU kernel for (op, T, U): " + ", ".join(
        f"({op}, {t}, {u})" for op, t, u in missing)


def test_mismatched_pairs_are_recognised():
    """The exclusion above leaves out the fused op's error-only pairs, and nothing else."""
    cpu = registered("CPU")
    left_out = {(op, pair) for op, pairs in cpu.items() for pair in pairs if mismatched(pair)}
    ops = {op for op, _ in left_out}
    assert ops == {"TfbnBatchNorm", "TfbnBatchNormGrad"}, sorted(left_out)
    assert len(left_out) == 8, sorted(left_out)
