"""fineviti: a kernel-optimised training engine for native-resolution vision encoders."""

__version__ = "0.1.0"

from fineviti import _ext

# Registers torch.ops.fineviti.* when the compiled extension is present; the Triton kernels
# (fineviti.kernels) and the pure-torch paths work without it.
_ext.load(required=False)


def __getattr__(name):
    # Lazy, so that `import fineviti` stays light: the model pulls in the ops and their kernels.
    if name == "create_model":
        from fineviti.model import create_model

        return create_model
    raise AttributeError(f"module 'fineviti' has no attribute {name!r}")
