import jax
from hypothesis import settings

# float64 references and gradients need x64; the library itself works in either mode.
jax.config.update("jax_enable_x64", True)

# CI runs the same property examples every time (a red run is reproducible); explore with
# `pytest --hypothesis-profile=explore`.
settings.register_profile("sortgrad", derandomize=True, database=None)
settings.register_profile("explore", max_examples=500)
settings.load_profile("sortgrad")
