"""Page faults per call of tfbn's forward and backward on a 25 MB tensor, interleaved with
FusedBatchNormV3, after warm-up; prints one JSON line.

Used by test_output_cache.py with TF_ENABLE_ONEDNN_OPTS=0, where TensorFlow's CPU
allocator is plain malloc, and with glibc's mmap threshold fixed at 1 MiB
(MALLOC_MMAP_THRESHOLD_), so that every large malloc is fresh memory: what glibc otherwise
does only now and then, depending on its state. Only tfbn's output cache then keeps its
outputs off fresh pages."""

import json
import os
import resource

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

import tfbn  # noqa: E402

x = tf.random.normal([32, 56, 56, 64])
dy = tf.random.normal([32, 56, 56, 64])
scale, offset = tf.ones([64]), tf.zeros([64])


@tf.function
def tfbn_step():
    with tf.GradientTape() as tape:
        tape.watch([x, scale, offset])
        y = tfbn.batch_norm(x, scale, offset, axis=-1)[0]
    dx = tape.gradient(y, [x, scale, offset], output_gradients=dy)[0]
    return y[0, 0, 0, 0] + dx[0, 0, 0, 0]


@tf.function
def fused_v3_step():
    y = tf.raw_ops.FusedBatchNormV3(x=x, scale=scale, offset=offset, mean=tf.zeros([0]),
                                    variance=tf.zeros([0]), epsilon=1e-3, is_training=True)[0]
    return y[0, 0, 0, 0]


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


for _ in range(10):
    tfbn_step().numpy(), fused_v3_step().numpy()
per_call = []
for _ in range(11):
    before = faults()
    tfbn_step().numpy()
    per_call.append(faults() - before)
    fused_v3_step().numpy()
# The median: fresh output pages fault on every call, while a one-off burst (the runtime
# growing a stack or an arena) once moved the mean of 10 calls past the test's limit.
print(json.dumps({"faults_per_call": sorted(per_call)[len(per_call) // 2], "each": per_call}))
