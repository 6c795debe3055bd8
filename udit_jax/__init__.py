"""udit-jax: U-shaped Diffusion Transformers (U-DiT) and DiT in JAX/Flax.

Submodules are imported lazily so that `import udit_jax` stays cheap:
`from udit_jax import models, convert, diffusion`.
"""

__version__ = "0.1.0"
