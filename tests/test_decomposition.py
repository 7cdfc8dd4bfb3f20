"""Tests of hocp_jax.decomposition: CP-ALS and Tucker-2 of dense kernels against numpy
reconstructions, tensorly (numpy backend) as an independent oracle, and dense convs."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorly as tl
from flax.core import freeze
from tensorly.decomposition import parafac, partial_tucker

from hocp_jax import conv, counting
from hocp_jax import decomposition as D


def _np_cp(cp, modes):
    ops = [np.asarray(cp[conv.mode_key(m)]) for m in modes] + [np.asarray(cp["factor_in"]), np.asarray(cp["factor_out"])]
    letters = "abcdef"[: len(ops)]
    spec = ",".join(f"{l}r" for l in letters) + ",r->" + letters
    return np.einsum(spec, *ops, np.asarray(cp["lambda"]))


def _low_rank(shape, rank, seed):
    rng = np.random.default_rng(seed)
    factors = [rng.normal(size=(s, rank)) for s in shape]
    return np.einsum("ar,br,cr,dr->abcd", *factors).astype(np.float32)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _dense_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape,rank,seed", [((3, 3, 6, 5), 3, 0), ((3, 3, 6, 5), 3, 2),
                                              pytest.param((3, 3, 16, 16), 8, 0, marks=pytest.mark.slow)])
def test_cp_als_float32_exact_low_rank_reaches_1e5_stops_early_and_beats_tensorly(shape, rank, seed):
    kernel = _low_rank(shape, rank, seed)
    progress = []
    cp, err = D.decompose(kernel, rank, n_iter=1000, callback=lambda i, e: progress.append((i, e)), report_every=1000)
    chex.assert_shape([cp["factor_h"], cp["factor_w"], cp["factor_in"], cp["factor_out"], cp["lambda"]],
                      [(3, rank), (3, rank), (shape[2], rank), (shape[3], rank), (rank,)])
    chex.assert_type(cp["lambda"], jnp.float32)
    oracle = _rel(_np_cp(cp, ("h", "w")), kernel)
    np.testing.assert_allclose(err, oracle, rtol=1e-3, atol=1e-7)
    assert oracle <= 1e-5, oracle
    assert len(progress) == 1 and progress[0][0] < 1000, progress  # the float32 stopping rule fired
    # tensorly's parafac (numpy backend, SVD init, line search, same sweep budget) on the same tensor
    weights, factors = parafac(kernel, rank, n_iter_max=1000, init="svd", tol=1e-12, linesearch=True)
    assert oracle <= max(_rel(tl.cp_to_tensor((weights, factors)), kernel), 1e-5)


def test_cp_als_full_rank_kernel_close_to_tensorly_and_reports_progress():
    kernel = np.random.default_rng(3).normal(size=(3, 3, 8, 8)).astype(np.float32)
    progress = []
    cp, err = D.decompose(kernel, 6, n_iter=400, tol=-np.inf, callback=lambda i, e: progress.append((i, e)), report_every=100)
    assert [i for i, _ in progress] == [100, 200, 300, 400]
    errs = [e for _, e in progress]
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), errs
    np.testing.assert_allclose(err, _rel(_np_cp(cp, ("h", "w")), kernel), rtol=1e-4)
    weights, factors = parafac(kernel.astype(np.float64), 6, n_iter_max=400, init="svd", tol=1e-12, linesearch=True)
    assert err <= 1.05 * _rel(tl.cp_to_tensor((weights, factors)), kernel)  # local minima may differ a little


@pytest.mark.slow
def test_decompose_recovers_known_rank_factors_float64():
    rank = 4
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        true = {"lambda": np.ones(rank), "factor_h": rng.normal(size=(3, rank)), "factor_w": rng.normal(size=(3, rank)),
                "factor_in": rng.normal(size=(5, rank)), "factor_out": rng.normal(size=(6, rank))}
        kernel = _np_cp(true, ("h", "w"))
        cp, err = D.decompose(jnp.asarray(kernel), rank, n_iter=3000)
        oracle = _rel(_np_cp(cp, ("h", "w")), kernel)
        np.testing.assert_allclose(err, oracle, rtol=1e-6, atol=1e-12)
        assert oracle < 1e-10


def test_decompose_tree_replaces_kernels_by_cp_leaves():
    C = 3
    rng = np.random.default_rng(1)
    r2 = {"lambda": np.ones(2), "factor_h": rng.normal(size=(3, 2)), "factor_w": rng.normal(size=(3, 2)),
          "factor_in": rng.normal(size=(C, 2)), "factor_out": rng.normal(size=(4, 2))}
    tree = {"block": {"conv": {"kernel": jnp.asarray(_np_cp(r2, ("h", "w")), jnp.float32), "bias": jnp.arange(4.0)}},
            "keep": {"conv": {"kernel": jnp.ones((1, 1, 4, 4))}}, "head": {"kernel": jnp.ones((4, 2))}}
    out, errors = D.decompose_tree(freeze(tree), lambda path, shape: 2 if path[0] == "block" else None)
    assert set(out["block"]["conv"]) == {"lambda", "factor_in", "factor_out", "factor_h", "factor_w", "bias"}
    assert set(errors) == {"block/conv"} and errors["block/conv"] < 1e-5
    np.testing.assert_array_equal(out["keep"]["conv"]["kernel"], tree["keep"]["conv"]["kernel"])
    x = jax.random.normal(jax.random.key(7), (2, 6, 6, C))
    want = _dense_conv(x, tree["block"]["conv"]["kernel"]) + jnp.arange(4.0)
    got = conv.cp_conv(x, out["block"]["conv"], modes=("h", "w"))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert D.rank_for("budget", ("keep", "conv"), (1, 1, 4, 4)) == counting.cp_rank_for_budget(4, 4, (1, 1))


def test_decompose_rank_above_the_other_modes_product_stays_finite():
    # (3, 3, 1, 2) at R=8: every Gram Hadamard product has rank <= 6 < R (singular: lstsq fallback)
    kernel = np.random.default_rng(5).normal(size=(3, 3, 1, 2)).astype(np.float32)
    cp, err = D.decompose(kernel, 8)
    chex.assert_tree_all_finite(cp)
    assert err < 1e-4 and _rel(_np_cp(cp, ("h", "w")), kernel) < 1e-4


def test_decompose_rejects_bad_inputs():
    kernel = jnp.ones((3, 3, 2, 2))
    for kwargs, match in (({"rank": 0}, "rank=0"), ({"rank": 2, "init": "hosvd"}, "init="), ({"rank": 2, "n_iter": -1}, "n_iter"),
                          ({"rank": 2, "report_every": 0}, "report_every"), ({"rank": 2, "modes": ("h",)}, "modes"),
                          ({"rank": 2, "ridge": -1.0}, "ridge=-1.0"), ({"rank": 2, "tol": np.inf}, "tol=inf"),
                          ({"rank": 2, "tol": float("nan")}, "tol=nan"), ({"rank": 2, "tol": "small"}, "tol='small'")):
        with pytest.raises(ValueError, match=match):
            D.decompose(kernel, **kwargs)
    with pytest.raises(ValueError, match="norm"):
        D.decompose(jnp.zeros((3, 3, 2, 2)), 2)
    for kwargs, match in (({"key": 0}, "key=0: expected a PRNG key"),  # was: JAX's invalid PRNG key data
                          ({"line_search": "no"}, "line_search='no': expected True or False")):  # was: read as on
        with pytest.raises(ValueError, match=match):
            D.decompose(kernel, 2, **kwargs)
    with pytest.raises(ValueError, match="dtype complex64, expected a real kernel"):  # was: its real part, silently
        D.decompose(kernel.astype(jnp.complex64), 2)
    with pytest.raises(ValueError, match="kernel"):
        D.decompose(jnp.ones((3, 2)), 2)
    with pytest.raises(ValueError, match="no dense conv kernel"):
        D.decompose_tree({"head": {"kernel": jnp.ones((4, 2))}}, 2)
    tree = {"block": {"kernel": jnp.ones((3, 3, 2, 2))}}
    with pytest.raises(ValueError, match=re.escape("rank_rule=-1: expected an int >= 1")):  # was: 'rank=-1'
        D.decompose_tree(tree, -1)
    with pytest.raises(ValueError, match=re.escape("rank_rule('block', (3, 3, 2, 2)) returned 0: expected an int >= 1")):
        D.decompose_tree(tree, lambda path, shape: 0)
    with pytest.raises(ValueError, match="ranks"):
        D.tucker_decompose(kernel, (3, 1))
    for kwargs, match in (({"n_iter": True}, "n_iter=True"), ({"n_iter": 2.5}, "n_iter=2.5"), ({"tol": float("nan")}, "tol=nan")):
        with pytest.raises(ValueError, match=match):
            D.tucker_decompose(kernel, (2, 2), **kwargs)
    # found by an audit (stop 79); before: accepted silently, or an error from inside numpy or JAX
    rng = np.random.default_rng(9)
    for ranks in ((8, 2), (2, 8)):  # a 1x1 kernel's core holds at most the other rank (was: a while_loop TypeError)
        with pytest.raises(ValueError, match=re.escape(f"ranks={ranks!r}: expected") + ".*R_in <= 1 R_out"):
            D.tucker_decompose(rng.standard_normal((1, 1, 8, 8)).astype(np.float32), ranks)
    for modes, match in (("hw", "modes='hw': expected a sequence"), (3, "modes=3"), (("", "w"), "non-empty names"),
                         (("h", "w", "t"), "expected 2 names")):
        with pytest.raises(ValueError, match=re.escape(match)):
            D.decompose(kernel, 2, modes=modes)
    for bad, match in ((None, "dtype object"), ("abc", "dtype <U3"), ([[[1, 2], [3]]], "not an array"),
                       (kernel > 0, "dtype bool"), (jnp.ones((3, 3, 0, 2)), "no axis of size 0")):
        with pytest.raises(ValueError, match="^kernel: .*" + re.escape(match)):
            D.decompose(bad, 2)
    with pytest.raises(ValueError, match="^callback=3: expected None"):  # was: 'int' object is not callable, after a chunk
        D.decompose(kernel, 2, callback=3)
    with pytest.raises(ValueError, match="^key=0: expected a PRNG key"):  # was: JAX's invalid PRNG key data
        D.decompose_tree({"block": {"kernel": kernel}}, 2, key=0)


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e20])
def test_the_fit_does_not_depend_on_the_kernels_scale(scale):
    """Before: the fit's float32 norms overflowed or underflowed outside about 1e-19..1e18 (CP-ALS raised, Tucker
    returned rel_error nan); now the kernel is fitted over its norm, which goes back into lambda and the core."""
    rng = np.random.default_rng(10)
    w = rng.standard_normal((3, 3, 6, 5))
    kernel = (w * scale).astype(np.float32)
    cp, err = D.decompose(kernel, 4, n_iter=60)
    assert err == pytest.approx(_rel(_np_cp(cp, ("h", "w")) / scale, w), rel=1e-4) and 0 < err < 1
    params, err = D.tucker_decompose(kernel, (3, 3))
    rebuilt = np.einsum("hwab,ca,tb->hwct", *(np.asarray(params[k], np.float64) for k in ("core", "factor_in", "factor_out")))
    assert err == pytest.approx(_rel(rebuilt / scale, w), rel=1e-4) and 0 < err < 1


def test_the_callback_is_called_once_per_chunk_that_ran():
    """Before: a fit converging at the end of a chunk ran an empty chunk and reported its sweep count twice."""
    rng = np.random.default_rng(11)
    exact = np.einsum("hr,wr,cr,tr->hwct", *(rng.normal(size=(n, 3)) for n in (3, 3, 4, 5))).astype(np.float32)
    _, _ = D.decompose(exact, 3)
    done = []
    D.decompose(exact, 3, report_every=1, callback=lambda i, e: done.append(i))
    assert done == list(range(1, len(done) + 1))


def test_tucker_decompose_matches_tensorly_and_dense_conv():
    rng = np.random.default_rng(4)
    # exactly Tucker-rank (2, 3) kernel: recovered to float32 precision, same conv output
    exact = np.einsum("hwab,ca,tb->hwct", rng.normal(size=(3, 3, 2, 3)), rng.normal(size=(6, 2)), rng.normal(size=(5, 3)))
    exact = exact.astype(np.float32)
    params, err = D.tucker_decompose(exact, (2, 3))
    chex.assert_shape([params["factor_in"], params["core"], params["factor_out"]], [(6, 2), (3, 3, 2, 3), (5, 3)])
    assert err < 1e-5 and _rel(conv.tucker_to_kernel(params), exact) < 1e-5
    x = jax.random.normal(jax.random.key(5), (2, 7, 7, 6))
    np.testing.assert_allclose(conv.tucker_conv(x, params, padding="SAME"), _dense_conv(x, exact), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(params["factor_in"].T @ params["factor_in"], np.eye(2), atol=1e-5)
    # a full-rank kernel: the same error as tensorly's partial_tucker on the channel modes (HOOI optimum)
    kernel = rng.normal(size=(3, 3, 8, 6)).astype(np.float32)
    params, err = D.tucker_decompose(kernel, (4, 3))
    (core, factors), _ = partial_tucker(kernel.astype(np.float64), rank=[4, 3], modes=[2, 3], n_iter_max=200, tol=1e-12)
    oracle = _rel(tl.tenalg.multi_mode_dot(core, factors, modes=[2, 3]), kernel)
    np.testing.assert_allclose(err, oracle, rtol=1e-3)
    np.testing.assert_allclose(err, _rel(conv.tucker_to_kernel(params), kernel), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_float_kernels_are_fitted_in_float32_and_returned_in_their_dtype(dtype):
    """XLA runs no linear algebra in bf16/f16: the fit runs in float32, the factors come back in
    the kernel's dtype, and the reported error is that of the returned (rounded) factors."""
    rng = np.random.default_rng(6)
    exact = np.einsum("hr,wr,cr,tr->hwct", *(rng.normal(size=(n, 3)) for n in (3, 3, 4, 5))).astype(np.float32)
    kernel = jnp.asarray(exact, dtype)
    cp, err = D.decompose(kernel, 3)
    assert {v.dtype for v in cp.values()} == {jnp.dtype(dtype)}
    oracle = _rel(_np_cp({k: np.asarray(v, np.float64) for k, v in cp.items()}, ("h", "w")), np.asarray(kernel, np.float64))
    np.testing.assert_allclose(err, oracle, rtol=1e-3)
    assert err < 2e-2  # the rounding of the factors to 8 (bf16) or 11 (f16) bits
    params, err = D.tucker_decompose(kernel, (4, 5))  # full channel ranks: exact up to rounding
    assert {v.dtype for v in params.values()} == {jnp.dtype(dtype)} and err < 2e-2
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    rebuilt = np.einsum("hwab,ca,tb->hwct", p64["core"], p64["factor_in"], p64["factor_out"])
    np.testing.assert_allclose(err, _rel(rebuilt, np.asarray(kernel, np.float64)), rtol=1e-3)
