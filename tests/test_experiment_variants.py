"""The experiments' patches-matmul dense conv (a JAX dense baseline) against lax's convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from benchmarks.experiments.variants import dense_patches


@pytest.mark.parametrize("spatial, kernel, strides, pads", [((5, 7, 6), (3, 3, 3), (1, 1, 1), ((1, 1),) * 3),
                                                             ((9, 8), (3, 2), (1, 1), ((1, 2), (0, 1))),
                                                             ((8, 9), (3, 3), (2, 2), ((1, 1), (1, 1)))])
def test_dense_patches_matches_lax_conv_values_and_gradients(spatial, kernel, strides, pads):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *spatial, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(*kernel, 3, 4)), jnp.float32)
    n = len(spatial)
    letters = "DHW"[-n:]
    dims = lax.conv_dimension_numbers(x.shape, k.shape, (f"N{letters}C", f"{letters}IO", f"N{letters}C"))

    def ref(x, k):
        return lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=dims)

    cot = jnp.asarray(rng.normal(size=ref(x, k).shape), jnp.float32)
    np.testing.assert_allclose(dense_patches(x, k, strides, pads), ref(x, k), rtol=1e-5, atol=1e-4)
    got = jax.grad(lambda x, k: jnp.sum(dense_patches(x, k, strides, pads) * cot), argnums=(0, 1))(x, k)
    want = jax.grad(lambda x, k: jnp.sum(ref(x, k) * cot), argnums=(0, 1))(x, k)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
