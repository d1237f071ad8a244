"""Finds and loads the compiled op library once, with errors that say how to fix it."""

import os
import warnings

import tensorflow as tf

_HERE = os.path.dirname(os.path.abspath(__file__))
OPS_LIBRARY_PATH = os.path.join(_HERE, "_tfbn_ops.so")
XLA_LIBRARY_PATH = os.path.join(_HERE, "_tfbn_xla.so")
_REBUILD = (
    "Rebuild tfbn against the installed TensorFlow: from the tfbn source tree run "
    "`pip install --no-build-isolation --force-reinstall .` (or `make install`)."
)


def _built_for():
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info.TENSORFLOW_VERSION


def _load():
    built_for = _built_for()
    if not os.path.exists(OPS_LIBRARY_PATH):
        raise ImportError(
            f"tfbn: the op library {OPS_LIBRARY_PATH} is missing (tfbn was not built, or "
            f"was installed without its compiled part). It must be built for TensorFlow "
            f"{tf.__version__}, the one installed. {_REBUILD}"
        )
    if built_for is not None and built_for != tf.__version__:
        raise ImportError(
            f"tfbn: the op library {OPS_LIBRARY_PATH} was built for TensorFlow {built_for}, "
            f"but TensorFlow {tf.__version__} is installed; custom ops only load into the "
            f"TensorFlow they were built with. {_REBUILD}"
        )
    try:
        return tf.load_op_library(OPS_LIBRARY_PATH)
    except (tf.errors.NotFoundError, tf.errors.OpError, OSError) as err:
        raise ImportError(
            f"tfbn: could not load the op library {OPS_LIBRARY_PATH} (built for TensorFlow "
            f"{built_for or 'unknown'}, running TensorFlow {tf.__version__}): {err}. "
            f"{_REBUILD}"
        ) from err


ops = _load()


def _load_xla():
    """Loads the XLA lowerings (a second library, so the ops work without it).

    Returns (loaded, reason). It loads after the op library: the lowerings name its ops.
    """
    try:
        from . import _build_info as b
    except ImportError:
        return False, "no build information (tfbn was not built)"
    if not b.XLA:
        return False, b.XLA_REASON or "built without the XLA lowerings"
    if not os.path.exists(XLA_LIBRARY_PATH):
        return False, f"{XLA_LIBRARY_PATH} is missing"
    try:
        tf.load_library(XLA_LIBRARY_PATH)
    except (tf.errors.NotFoundError, tf.errors.OpError, OSError) as err:
        warnings.warn(
            f"tfbn: could not load the XLA lowerings {XLA_LIBRARY_PATH} ({err}); the tfbn "
            f"ops work, but not under jit_compile=True. {_REBUILD}",
            RuntimeWarning,
            stacklevel=2,
        )
        return False, f"{XLA_LIBRARY_PATH} failed to load: {err}"
    return True, ""


XLA_LOADED, XLA_REASON = _load_xla()


def build_info():
    """What this build contains: TensorFlow version, CUDA kernels (the NVRTC version that
    compiled them, "cuda_version", their architectures, and how their images are embedded,
    "cuda_image_compression": zlib or none),
    whether the XLA lowerings are in it and loaded ("xla"; "xla_reason" says why not), and
    the instruction set the CPU kernels run on ("cpu_instruction_set": isa, supported,
    requested = TFBN_CPU_ISA, warning = why that request was not honoured)."""
    from . import _build_info as b
    from . import _core

    archs = [a for a in b.CUDA_ARCHITECTURES.replace(",", ";").split(";") if a]
    return {
        "tensorflow_version": b.TENSORFLOW_VERSION,
        "cxx11_abi": b.CXX11_ABI,
        "cuda": b.CUDA,
        "cuda_version": b.CUDA_VERSION,
        "cuda_architectures": archs,
        "cuda_image_compression": b.CUDA_IMAGE_COMPRESSION,
        "xla": XLA_LOADED,
        "xla_reason": XLA_REASON,
        "compiler": b.COMPILER,
        "ops_library": OPS_LIBRARY_PATH,
        "cpu_instruction_set": _core.cpu_instruction_set_info(),
    }
