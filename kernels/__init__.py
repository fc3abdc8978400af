"""fineviti's Triton kernels, installed as `fineviti.kernels` (never as a top-level `kernels`).

Importing the package imports every kernel module in it, so that each declares what it ships in
`fineviti.kernels.registry`. Nothing here needs the compiled extension `fineviti._C`.
"""

import importlib
import pkgutil

from . import registry  # noqa: F401  (fineviti.kernels.registry is public)

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")
