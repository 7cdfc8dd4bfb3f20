"""hocp-jax: factorized higher-order convolutions in JAX.

The core (``hocp_jax.conv``, ``hocp_jax.counting``, ``hocp_jax.transforms``,
``hocp_jax.metrics``, ``hocp_jax.losses``) is pure functions on pytrees; Flax
modules live in ``hocp_jax.layers`` and ``hocp_jax.models``.
"""

__version__ = "0.1.0"
