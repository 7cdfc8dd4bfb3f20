"""Dense -> HO-CP conversion: the converted tree is exactly the HO-CP model's, and the HO-CP
model on it computes what the dense model computes with the reconstructed kernels."""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hocp_jax import conv
from hocp_jax.conversion import dense_to_hocp
from hocp_jax.models import get_model
from hocp_jax.tree import get_at, set_at, to_dict

X = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
SMALL = dict(tiny=True, stage_sizes=(1, 1), widths=(8, 8))  # stem, 4 3x3 convs, one 1x1 stride-2 shortcut


@pytest.fixture(scope="module")
def converted():
    dense = get_model("resnet18", **SMALL)
    variables = to_dict(dense.init(jax.random.key(1), X))
    # non-trivial BN statistics, so carrying them over is checked
    variables["batch_stats"] = jax.tree.map(lambda v: v + 0.05, variables["batch_stats"])
    progress = []
    new, errors = dense_to_hocp(variables, "budget", n_iter=50, report_every=25,
                                callback=lambda path, i, e: progress.append((path, i, e)))
    assert {p for p, _, _ in progress} == set(errors) and all(i <= 50 for _, i, _ in progress)
    return dense, variables, new, errors


def test_a_layers_init_depends_on_its_path_alone():
    """Before: the per-layer keys were a split of ``key`` by position among the converted convs, so converting a
    1x1 shortcut too (or one layer fewer) before a conv changed that conv's init and fit."""
    rng = np.random.default_rng(3)
    params = {"a": {"shortcut": {"conv": {"kernel": jnp.asarray(rng.normal(size=(1, 1, 4, 4)), jnp.float32)}}},
              "b": {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.float32)}}}
    alone, _ = dense_to_hocp({"params": params}, 8, n_iter=20)  # rank 8 > 3 taps: the init draws random columns
    both, _ = dense_to_hocp({"params": params}, 8, n_iter=20, shortcut="cp")
    assert set(both["params"]["a"]["shortcut"]) == {"lambda", "factor_in", "factor_out", "factor_h", "factor_w"}
    chex.assert_trees_all_equal(both["params"]["b"], alone["params"]["b"])


def test_converted_tree_is_the_hocp_models_tree(converted):
    _, variables, new, errors = converted
    hocp = get_model("resnet18_hocp", **SMALL)
    expected = hocp.init(jax.random.key(2), X)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, to_dict(expected))
    assert set(errors) == {"stem", "layer1_0/conv1", "layer1_0/conv2", "layer2_0/conv1", "layer2_0/conv2"}
    assert all(0 <= e < 1 for e in errors.values())
    # shortcuts stay dense and, like BN params/stats and the head, are carried over bitwise
    np.testing.assert_array_equal(new["params"]["layer2_0"]["shortcut"]["conv"]["kernel"],
                                  variables["params"]["layer2_0"]["shortcut"]["conv"]["kernel"])
    chex.assert_trees_all_equal(new["batch_stats"], variables["batch_stats"])
    chex.assert_trees_all_equal(new["params"]["head"], variables["params"]["head"])


def test_hocp_outputs_equal_dense_model_with_reconstructed_kernels(converted):
    dense, variables, new, errors = converted
    hocp = get_model("resnet18_hocp", **SMALL)
    # oracle: the DENSE model with every converted kernel replaced by its CP reconstruction
    recon = variables["params"]
    for path in errors:
        keys = tuple(path.split("/"))
        recon = set_at(recon, keys + ("conv", "kernel"), conv.cp_to_kernel(get_at(new["params"], keys), ("h", "w")))
    want = dense.apply({**variables, "params": recon}, X)["va"]
    got = hocp.apply(new, X)["va"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and the reconstruction error is what decompose reported
    for path, err in errors.items():
        keys = tuple(path.split("/"))
        w = get_at(variables["params"], keys + ("conv", "kernel"))
        w_hat = get_at(recon, keys + ("conv", "kernel"))
        np.testing.assert_allclose(float(jnp.linalg.norm(w - w_hat) / jnp.linalg.norm(w)), err, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_full_rank_conversion_reproduces_dense_outputs():
    # 1x1-channel toy: a (3, 3, 1, 2) stem-like kernel has CP rank <= 2 -> exact at rank 3
    dense = get_model("resnet18", tiny=True, stage_sizes=(1,), widths=(2,), stem_kernel=3)
    hocp = get_model("resnet18_hocp", tiny=True, stage_sizes=(1,), widths=(2,), stem_kernel=3)
    x = X[..., :1]
    variables = to_dict(dense.init(jax.random.key(3), x))
    new, errors = dense_to_hocp(variables, 8, n_iter=1000)
    assert max(errors.values()) < 1e-4, errors
    np.testing.assert_allclose(hocp.apply(new, x)["va"], dense.apply(variables, x)["va"], rtol=1e-3, atol=1e-4)


def test_dense_to_hocp_rejects_bad_inputs():
    with pytest.raises(ValueError, match="'params'"):
        dense_to_hocp({"batch_stats": {}})
    with pytest.raises(ValueError, match="shortcut="):
        dense_to_hocp({"params": {}}, shortcut="none")
    with pytest.raises(ValueError, match="no dense conv"):
        dense_to_hocp({"params": {"head": {"kernel": jnp.ones((4, 2))}}})
    with pytest.raises(ValueError, match="^rank='max': expected an int"):  # its own argument's name, not rank_rule
        dense_to_hocp({"params": {"b": {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}}}}, "max")
    # found by an audit (stop 79); before: TypeErrors from decompose, functools or JAX, or "no dense conv"
    one_conv = {"params": {"b": {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}}}}
    for kwargs, match in (({"modes": ("h", "w")}, "modes=('h', 'w'): dense_to_hocp sets decompose's ['modes']"),
                          ({"callback": 3}, "callback=3: expected None"), ({"key": 0}, "key=0: expected a PRNG key")):
        with pytest.raises(ValueError, match="^" + re.escape(match)):
            dense_to_hocp(one_conv, 2, **kwargs)
    with pytest.raises(ValueError, match=re.escape("the conv at 'b/conv' holds ['bias'] beside its kernel")):
        dense_to_hocp({"params": {"b": {"conv": {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.zeros(2)}}}}, 2)


def test_video_kernels_become_the_temporal_and_spatial_factors_of_the_hocp_twin():
    """A 3-D kernel's modes are named (t, h, w), as CPConv names them on video, so the Jester
    net's dense variables convert into a tree its HO-CP twin applies."""
    dense, hocp = get_model("jester", tiny=True), get_model("jester_hocp", tiny=True)
    x = jax.random.normal(jax.random.key(4), (1, 16, 16, 16, 3))
    variables = to_dict(dense.init(jax.random.key(5), x))
    new, errors = dense_to_hocp(variables, lambda path, shape: 6 * shape[-2], n_iter=5)  # the twin's rank rule
    chex.assert_trees_all_equal_shapes_and_dtypes(new, to_dict(hocp.init(jax.random.key(6), x)))
    kernel = get_at(variables["params"], ("conv2", "conv", "kernel"))
    w_hat = conv.cp_to_kernel(new["params"]["conv2"], ("t", "h", "w"))
    np.testing.assert_allclose(float(jnp.linalg.norm(kernel - w_hat) / jnp.linalg.norm(kernel)), errors["conv2"], rtol=1e-3)
    assert hocp.apply(new, x)["logits"].shape == (1, 27)
