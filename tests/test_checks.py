"""Integer arguments: NumPy ints are accepted, bools and non-integers refused with the argument's name.

``True`` is an ``int`` subclass in Python, so a hand-written ``isinstance(v, int)`` check lets
``kernel_size=True`` or ``n_iter=True`` through as 1; every such check goes through
``hocp_jax.checks``.
"""

import flax.linen as nn  # noqa: F401  (Flax first: the model modules import it)
import jax.numpy as jnp
import numpy as np
import pytest

from hocp_jax import autotune, checks, conv_plans, decomposition, layer_specs, transduction
from hocp_jax.data.jester import JesterConfig
from hocp_jax.models.bregnet import BReGNet
from hocp_jax.models.heads import HeadConfig
from hocp_jax.training.checkpoint import Checkpointer


def test_check_int_takes_numpy_ints_and_refuses_bools_floats_and_low_values():
    assert checks.check_int(np.int64(3), "n", 0) == 3 and type(checks.check_int(np.int64(3), "n", 0)) is int
    assert checks.check_int(0, "n", 0) == 0
    for bad in (True, False, 2.0, "2", None, -1):
        with pytest.raises(ValueError, match=r"n=.*expected an int >= 0"):
            checks.check_int(bad, "n", 0)
    with pytest.raises(ValueError, match=r"rank=0: expected an int >= 1"):
        checks.check_positive_int(0, "rank")


def test_as_ints_reads_one_int_or_n_ints_and_names_the_argument():
    assert layer_specs.as_ints(np.int32(3), 2, "kernel_size") == (3, 3)
    assert layer_specs.as_ints([np.int64(1), 2], 2, "stride") == (1, 2)
    for bad in (True, (3, True), (3, "a"), (3, 3.0), (3, 3, 3), "33", 3.0):
        with pytest.raises(ValueError, match="kernel_size="):
            layer_specs.as_ints(bad, 2, "kernel_size")


@pytest.mark.parametrize("make, match", [
    (lambda: decomposition.decompose(jnp.ones((3, 3, 2, 2)), 2, n_iter=True), "n_iter=True"),
    (lambda: decomposition.decompose(jnp.ones((3, 3, 2, 2)), True), "rank=True"),
    (lambda: decomposition.decompose(jnp.ones((3, 3, 2, 2)), 2, n_iter=2, report_every=True), "report_every=True"),
    (lambda: transduction.check_new_modes({"t": True}, "ones"), r"modes\['t'\]=True"),
    (lambda: autotune.configure(batch_shards=True), "batch_shards=True"),
    (lambda: conv_plans.batch_shards_mode(True).__enter__(), "value=True"),
    (lambda: HeadConfig(n_outputs=True), "n_outputs=True"),
    (lambda: JesterConfig(name="x", num_frames=True), "num_frames=True"),
    (lambda: Checkpointer("/nonexistent-never-created", save_every=True), "save_every"),
    (lambda: BReGNet(stage_sizes=(True, 1, 1))._validate(jnp.ones((1, 8, 8, 3))), "stage_sizes="),
])
def test_a_bool_is_not_a_count(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_numpy_ints_are_counts():
    _, rel = decomposition.decompose(jnp.ones((3, 3, 2, 2)), np.int64(1), n_iter=np.int64(3))
    assert rel < 1e-4  # an all-ones kernel is rank 1
    assert transduction.check_new_modes({"t": np.int64(3)}, "ones") == {"t": 3}
    assert HeadConfig(n_outputs=np.int64(2)).n_outputs == 2
