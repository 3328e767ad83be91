import jax

# float64 references and gradients need x64; the library itself works in either mode.
jax.config.update("jax_enable_x64", True)
