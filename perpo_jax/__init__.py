"""perpo_jax: discriminative rewarding + listwise preference optimisation for LLaVA in JAX.

Import-light on purpose: `perpo_jax.rewards` runs host-side without jax, so this package
root imports nothing heavy. Import submodules directly.
"""

__version__ = "0.1.0"
