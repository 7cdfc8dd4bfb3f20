"""The package surface: ``hocp_jax`` exports its public API."""
import hocp_jax


def test_public_api_is_exported_from_its_modules():
    missing = [name for name in hocp_jax.__all__ if not hasattr(hocp_jax, name)]
    assert not missing
    assert hocp_jax.transduce is hocp_jax.transduction.transduce
    assert hocp_jax.dense_to_hocp is hocp_jax.conversion.dense_to_hocp
    assert hocp_jax.prox_l1_lambdas is hocp_jax.optim.prox_l1_lambdas

