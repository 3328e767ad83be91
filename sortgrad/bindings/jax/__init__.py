"""JAX bindings: custom-derivative ops whose passes run the public kernel API
(`sortgrad.kernels`) through callbacks on XLA's buffers (`_call.py`)."""

from ._call import callback_mode, get_callback_mode, set_callback_mode
from .hard import argsort, sort, top_k
from .perturbed import perturbed_top_k
from .soft import soft_quantile, soft_rank, soft_sort, soft_top_k_mask

__all__ = ["sort", "argsort", "top_k", "soft_sort", "soft_rank", "soft_top_k_mask",
           "soft_quantile", "perturbed_top_k", "set_callback_mode", "get_callback_mode",
           "callback_mode"]
