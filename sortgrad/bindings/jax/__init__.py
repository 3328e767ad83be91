"""JAX bindings: custom-derivative ops whose passes run the public kernel API
(`sortgrad.kernels`) through callbacks on XLA's buffers (`_call.py`).

The public ops are the `__all__` of every public module here (one module per family of ops:
`hard`, `soft`, `perturbed`; a new binding module is picked up without further edits), plus
the callback-mode switches of `_call` and the GPU-backend switches of `_device`.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from ._call import callback_mode, get_callback_mode, set_callback_mode
from ._device import get_gpu_backend, gpu_backend, set_gpu_backend

__all__ = []
for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda info: info.name):
    if not _info.name.startswith("_"):
        _module = _importlib.import_module(f".{_info.name}", __name__)
        for _name in _module.__all__:
            globals()[_name] = getattr(_module, _name)
            __all__.append(_name)
__all__ += ["set_callback_mode", "get_callback_mode", "callback_mode", "set_gpu_backend",
            "get_gpu_backend", "gpu_backend"]
