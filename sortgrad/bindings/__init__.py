"""Framework bindings over the public kernel API (`sortgrad.kernels`): `bindings.jax` today;
a PyTorch binding would be a sibling over the same kernels."""
