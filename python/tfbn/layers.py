"""Keras 3 drop-in for keras.layers.BatchNormalization running the fused op."""

import keras
import tensorflow as tf

from ._library import XLA_LOADED as _XLA
from .ops import batch_norm, param_dtype

_FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


@keras.saving.register_keras_serializable(package="tfbn")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` with the fused tfbn op.

    Same constructor arguments, defaults, weights (gamma, beta, moving_mean,
    moving_variance, in that order) and `get_config` as Keras' layer, so weights transfer
    with `set_weights(keras_bn.get_weights())`. float16/bfloat16 inputs are normalized
    natively (float32 statistics), without up-casting copies. A batch with no elements
    or non-finite statistics leaves the moving statistics of the affected channels
    unchanged. `synchronized=True` normalizes with the statistics of the global batch
    under a tf.distribute strategy (one all-gather forward, one all-reduce backward; see
    tfbn.distributed). Options the fused op does not cover yet (renorm, mask, rank-1
    inputs) run Keras' own implementation.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Keras' jit_compile="auto" (and jit_compile=True) use XLA only where every layer
        # supports it: this layer does where the ops' XLA lowerings are built and loaded.
        self.supports_jit = _XLA

    def _fused_applies(self, inputs, training, mask):
        return (
            mask is None
            and not self.renorm
            and isinstance(training, (bool, type(None)))
            and inputs.shape.rank is not None
            and inputs.shape.rank >= 2
        )

    def call(self, inputs, training=None, mask=None):
        inputs = tf.convert_to_tensor(inputs)
        if not self._fused_applies(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        if inputs.dtype not in _FUSED_DTYPES:
            inputs = tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        dtype = param_dtype(inputs.dtype)
        gamma = tf.cast(self.gamma, dtype) if self.scale else None
        beta = tf.cast(self.beta, dtype) if self.center else None
        moving_mean = tf.cast(self.moving_mean, dtype)
        moving_variance = tf.cast(self.moving_variance, dtype)
        if training and self.trainable:
            outputs, mean, variance = batch_norm(
                inputs, gamma, beta, axis=self.axis, epsilon=self.epsilon, training=True,
                synchronized=self.synchronized,
            )
            # Keras' update rule; channels whose batch statistics are not finite (empty
            # batch, inf/nan data) keep their moving statistics.
            ok = tf.math.is_finite(mean) & tf.math.is_finite(variance)
            new_mean = moving_mean * self.momentum + mean * (1.0 - self.momentum)
            new_variance = moving_variance * self.momentum + variance * (1.0 - self.momentum)
            self.moving_mean.assign(
                tf.cast(tf.where(ok, new_mean, moving_mean), self.moving_mean.dtype)
            )
            self.moving_variance.assign(
                tf.cast(tf.where(ok, new_variance, moving_variance), self.moving_variance.dtype)
            )
        else:
            outputs, _, _ = batch_norm(
                inputs,
                gamma,
                beta,
                moving_mean,
                moving_variance,
                axis=self.axis,
                epsilon=self.epsilon,
                training=False,
            )
        return tf.cast(outputs, self.compute_dtype)
