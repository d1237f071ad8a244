"""tfbn: fused Batch Normalization for TensorFlow and a Keras 3 drop-in layer.

`import tfbn` loads the compiled op library (once) and registers the ops' gradients and
the Keras layer for serialization.
"""

from . import distributed
from ._library import build_info
from .convert import convert
from .layers import BatchNormalization
from .ops import batch_norm

__version__ = "0.1.0"
__all__ = ["batch_norm", "BatchNormalization", "convert", "build_info", "distributed",
           "__version__"]
