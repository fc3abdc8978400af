"""fineviti: a kernel-optimised training engine for native-resolution vision encoders."""

__version__ = "0.1.0"

from fineviti import _ext

# Registers torch.ops.fineviti.* when the compiled extension is present; the Triton kernels
# (fineviti.kernels) and the pure-torch paths work without it.
_ext.load(required=False)
