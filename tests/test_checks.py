"""Integer arguments: NumPy ints are accepted, bools and non-integers refused with the argument's name.

``True`` is an ``int`` subclass in Python, so a hand-written ``isinstance(v, int)`` check lets
``kernel_size=True`` or ``n_iter=True`` through as 1; every such check goes through
``hocp_jax.checks``.
"""

import flax.linen as nn  # noqa: F401  (Flax first: the model modules import it)
import jax.numpy as jnp
import numpy as np
import pytest

from hocp_jax import autotune, checks, conv_plans, decomposition, explicit_sharding, layer_specs, transduction, tree
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
    (lambda: BReGNet(stage_sizes=(True, 1, 1)), "stage_sizes="),
])
def test_a_bool_is_not_a_count(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_numpy_ints_are_counts():
    _, rel = decomposition.decompose(jnp.ones((3, 3, 2, 2)), np.int64(1), n_iter=np.int64(3))
    assert rel < 1e-4  # an all-ones kernel is rank 1
    assert transduction.check_new_modes({"t": np.int64(3)}, "ones") == {"t": 3}
    assert HeadConfig(n_outputs=np.int64(2)).n_outputs == 2


def test_conv_plans_modes_take_numpy_bools_and_ints_as_python_values():
    """Before: the ``*_mode`` blocks refused ``np.True_`` (check_flags takes it), ``target_mode(['cpu'])``
    was "unhashable", and a NumPy ``tile_rows`` went into the cache keys' JSON as is."""
    with conv_plans.per_sample_mode(np.False_), conv_plans.tile_rows_mode(np.int64(3)), \
            conv_plans.upcast_mode(np.True_), conv_plans.dense_chunks_mode(np.False_):
        in_force = conv_plans.modes_in_force()
        assert in_force[:4] == (False, 3, True, False) and [type(v) for v in in_force[:4]] == [bool, int, bool, bool]
    autotune.configure(per_sample=np.True_, tile_rows=np.int64(2), batch_shards=np.int64(2))
    try:
        assert conv_plans.modes_in_force()[:2] == (True, 2) and conv_plans.device_shape((4, 3)) == (2, 3)
    finally:
        autotune.configure()
    with pytest.raises(ValueError, match=r"platform=\['cpu'\]: expected one of"):
        conv_plans.target_mode(["cpu"])


def test_tree_helpers_name_a_missing_key():
    """Before: KeyErrors ('b', 'factor_in') and a TypeError for a path through a leaf."""
    with pytest.raises(ValueError, match=r"path: key 'b' not in the tree \(got keys \['a'\] there\)"):
        tree.set_at({"a": {}}, ("b", "c"), 1)
    with pytest.raises(ValueError, match="path: key 'c' not in the tree"):
        tree.set_at({"a": 1}, ("a", "c"), 1)
    assert tree.set_at({"a": {"b": 1}}, ("a", "b"), 2) == {"a": {"b": 2}}
    with pytest.raises(ValueError, match=r"expected a CP layer .* got keys \['factor_out', 'lambda'\]"):
        tree.check_cp_layer({"lambda": np.ones(2), "factor_out": np.ones((3, 2))})


def test_shards_names_an_axis_out_of_range():
    x = jnp.ones((4, 3))
    assert explicit_sharding.shards(x, -1) is None
    with pytest.raises(ValueError, match=r"axis=5: expected an int in \[-2, 2\)"):  # was: an IndexError
        explicit_sharding.shards(x, 5)


def test_layer_specs_refuse_zero_sizes_and_take_numpy_ints():
    """Before: ZeroDivisionErrors, and a NumPy int padding refused as "not an int"."""
    with pytest.raises(ValueError, match=r"dims=\(0, 3\): expected a non-empty sequence of ints >= 1"):
        layer_specs.trl_specs((0, 3), 2, 2, "cp")
    with pytest.raises(ValueError, match=r"ranks=\(0, 2\)"):
        layer_specs.tucker_specs(4, 4, (3, 3), (0, 2))
    for args, match in (((1.0, 0, 1), "n_terms=0"), ((1.0, 1, 0), "n_sums=0"), ((0.0, 1, 1), "variance=0.0")):
        with pytest.raises(ValueError, match=match):
            layer_specs.product_std(*args)
    common = dict(stride=1, dilation=1, temporal_stride=1, temporal_padding=1, implementation="auto", psi=None)
    assert layer_specs.cp_conv_kwargs(("h", "w"), (), padding=np.int64(1), **common)["padding"] == (1, 1)
    with pytest.raises(ValueError, match="padding=True"):
        layer_specs.cp_conv_kwargs(("h", "w"), (), padding=True, **common)
