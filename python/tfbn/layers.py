"""Keras 3 drop-in for keras.layers.BatchNormalization running the fused op."""

import keras
import tensorflow as tf

from . import distributed, portable, split
from ._library import XLA_LOADED as _XLA
from .ops import _check_epsilon, apply_activation, batch_norm, canonical_activation, param_dtype

_FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
# What inference (training=False) runs on: TensorFlow's standard ops, which any TensorFlow
# process, TF Serving and TFLite run and grappler folds into a preceding convolution, or
# tfbn's op (faster in some places, but an exported graph then needs tfbn's library).
INFERENCE_OPS = ("tensorflow", "tfbn")


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
    tfbn.distributed).

    `renorm=True` and a `mask` in training run on the split kernels (tfbn.split), with
    Keras' semantics: renorm's (r, d) correction, clipping, `renorm_momentum` and the
    moving_stddev / renorm_mean / renorm_stddev variables as Keras updates them; the mask
    (rank - 1, broadcast over the channels, nonzero = counted) weights the statistics and
    every element is normalized with them. Differences from Keras: the masked mean is
    sum / count exactly (Keras divides by count + 1e-7); a batch with no unmasked element
    is normalized as Keras does (mean 0, variance 0) but leaves the moving statistics
    unchanged; with `synchronized=True` masked statistics are those of the global batch
    (Keras' masked path uses each replica's own). Masks with a channel axis other than
    the last (where Keras' mask broadcast gives every channel its own weights), a
    tensor-valued `training` and rank-1 inputs run Keras' own implementation.

    Fused epilogue: `activation` (None, 'linear', 'relu', 'relu6', 'silu' or 'swish')
    and `call(..., residual=shortcut)` give `activation(BN(inputs) + residual)` in one
    op (a ResNet block's tail); the residual is cast to the layer's compute dtype. Where
    the split kernels (renorm, masks) or Keras' own math run, the add and the activation
    follow them as TensorFlow ops.

    Inference (`training` False or None) runs, by default (`inference_op='tensorflow'`),
    as TensorFlow's standard ops (FusedBatchNormV3 for 4-D channels-last data, then the
    epilogue's add and activation): a SavedModel or TFLite model exported from it carries
    no tfbn op, and grappler folds the normalization into a preceding Conv2D.
    `inference_op='tfbn'` runs inference on tfbn's op instead (exports then need tfbn's
    library). Training, and a layer with `trainable=False` called with `training=True`,
    run on tfbn's kernels.
    """

    def __init__(self, *args, activation=None, inference_op="tensorflow", **kwargs):
        super().__init__(*args, **kwargs)
        if inference_op not in INFERENCE_OPS:
            raise ValueError(
                "tfbn.BatchNormalization: inference_op must be 'tensorflow' or 'tfbn', got "
                f"inference_op={inference_op!r}"
            )
        self.inference_op = inference_op
        # Refuses unknown names; None, "linear" and "identity" are all stored as None.
        if canonical_activation(activation, "tfbn.BatchNormalization") == "identity":
            activation = None
        self.activation = activation
        # Keras' jit_compile="auto" (and jit_compile=True) use XLA only where every layer
        # supports it: this layer does where the ops' XLA lowerings are built and loaded.
        self.supports_jit = _XLA

    def _fused_applies(self, inputs, training, mask):
        rank = inputs.shape.rank
        if not (isinstance(training, (bool, type(None))) and rank is not None and rank >= 2):
            return False
        # Keras broadcasts the mask against the last axis: with channels elsewhere every
        # channel gets its own weights, which the statistics kernel does not take.
        masked = mask is not None and training and self.trainable
        return not masked or self.axis in (-1, rank - 1)

    def get_config(self):
        # Only where used: the config of a layer without an epilogue stays Keras' own.
        config = super().get_config()
        if self.activation is not None:
            config["activation"] = self.activation
        if self.inference_op != "tensorflow":
            config["inference_op"] = self.inference_op
        return config

    def call(self, inputs, training=None, mask=None, residual=None):
        inputs = tf.convert_to_tensor(inputs)
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask provided should be one dimension less than the inputs. "
                f"Received: mask.shape={mask.shape}, inputs.shape={inputs.shape}"
            )
        activation = canonical_activation(self.activation)
        if not self._fused_applies(inputs, training, mask):
            outputs = super().call(inputs, training=training, mask=mask)
            if residual is not None:
                outputs = outputs + tf.cast(residual, outputs.dtype)
            return apply_activation(outputs, activation)
        if inputs.dtype not in _FUSED_DTYPES:
            inputs = tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        if residual is not None:
            residual = tf.cast(residual, inputs.dtype)
        dtype = param_dtype(inputs.dtype)
        gamma = tf.cast(self.gamma, dtype) if self.scale else None
        beta = tf.cast(self.beta, dtype) if self.center else None
        moving_mean = tf.cast(self.moving_mean, dtype)
        moving_variance = tf.cast(self.moving_variance, dtype)
        if training and self.trainable and (self.renorm or mask is not None):
            outputs = self._split_call(inputs, gamma, beta, mask, dtype)
            if residual is not None:
                outputs = outputs + residual
            outputs = apply_activation(outputs, activation)
        elif training and self.trainable:
            outputs, mean, variance = batch_norm(
                inputs, gamma, beta, axis=self.axis, epsilon=self.epsilon, training=True,
                synchronized=self.synchronized, residual=residual, activation=activation,
            )
            # Keras' update rule; channels whose batch statistics are not finite (empty
            # batch, inf/nan data) keep their moving statistics.
            ok = tf.math.is_finite(mean) & tf.math.is_finite(variance)
            new_mean = moving_mean * self.momentum + mean * (1.0 - self.momentum)
            new_variance = moving_variance * self.momentum + variance * (1.0 - self.momentum)
            self._assign_where(ok, self.moving_mean, new_mean, moving_mean)
            self._assign_where(ok, self.moving_variance, new_variance, moving_variance)
        elif not training and self.inference_op == "tensorflow":
            outputs = portable.batch_norm_inference(
                inputs, gamma, beta, moving_mean, moving_variance, axis=self.axis,
                epsilon=_check_epsilon(self.epsilon), residual=residual,
                activation=activation,
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
                residual=residual,
                activation=activation,
            )
        return tf.cast(outputs, self.compute_dtype)

    @staticmethod
    def _assign_where(ok, variable, new, old):
        variable.assign(tf.cast(tf.where(ok, new, old), variable.dtype))

    def _split_call(self, inputs, gamma, beta, mask, dtype):
        """Training with renorm and/or a mask on the split kernels (tfbn.split)."""
        eps = _check_epsilon(self.epsilon)
        weights = None
        if mask is not None:  # Keras: nonzero counts, broadcast over the channels
            mask = tf.cast(tf.convert_to_tensor(mask), tf.bool)
            weights = tf.cast(tf.broadcast_to(mask, tf.shape(inputs)[:-1]), tf.float32)
        correction = None
        if self.renorm:
            renorm_mean = tf.cast(self.renorm_mean, dtype)
            renorm_stddev = tf.cast(self.renorm_stddev, dtype)
            correction = split.renorm_correction(
                renorm_mean, renorm_stddev, epsilon=self.epsilon,
                clipping=self.renorm_clipping,
            )
        ctx = distributed.replica_context() if self.synchronized else None
        outputs, mean, variance = split.split_batch_norm(
            inputs, gamma, beta, axis=self.axis, epsilon=eps, ctx=ctx, weights=weights,
            correction=correction,
        )
        # Channels whose statistics are not finite (no element or no weight, inf/nan data)
        # keep every moving statistic.
        ok = tf.math.is_finite(mean) & tf.math.is_finite(variance)
        moving_mean = tf.cast(self.moving_mean, dtype)
        new_mean = moving_mean * self.momentum + mean * (1.0 - self.momentum)
        self._assign_where(ok, self.moving_mean, new_mean, moving_mean)
        moving_variance = tf.cast(self.moving_variance, dtype)
        if not self.renorm:
            new_variance = moving_variance * self.momentum + variance * (1.0 - self.momentum)
            self._assign_where(ok, self.moving_variance, new_variance, moving_variance)
            return outputs
        # Keras' renorm updates: renorm_mean/renorm_stddev with renorm_momentum, the
        # moving mean and stddev with momentum, and moving_variance from moving_stddev.
        stddev = tf.sqrt(variance + tf.constant(self.epsilon, dtype))
        rm = self.renorm_momentum
        new_renorm_mean = renorm_mean * rm + mean * (1.0 - rm)
        new_renorm_stddev = renorm_stddev * rm + stddev * (1.0 - rm)
        self._assign_where(ok, self.renorm_mean, new_renorm_mean, renorm_mean)
        self._assign_where(ok, self.renorm_stddev, new_renorm_stddev, renorm_stddev)
        moving_stddev = tf.cast(self.moving_stddev, dtype)
        new_stddev = moving_stddev * self.momentum + stddev * (1.0 - self.momentum)
        self._assign_where(ok, self.moving_stddev, new_stddev, moving_stddev)
        new_variance = tf.nn.relu(new_stddev * new_stddev - tf.constant(self.epsilon, dtype))
        self._assign_where(ok, self.moving_variance, new_variance, moving_variance)
        return outputs
