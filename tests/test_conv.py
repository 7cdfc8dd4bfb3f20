"""CP / Tucker / separable convs against independent dense computations."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from hocp_jax import conv, conv_ops, conv_plans, init
from hocp_jax.padding import resolve_padding

RTOL = 1e-4


def np_kernel(p, modes):
    """Independent numpy reconstruction of the CP kernel (*K, C_in, C_out)."""
    k = np.einsum("cr,tr,r->ctr", np.asarray(p["factor_in"]), np.asarray(p["factor_out"]), np.asarray(p["lambda"]))
    for m in modes:
        k = k[None] * np.asarray(p[f"factor_{m}"]).reshape((-1,) + (1,) * (k.ndim - 1) + (k.shape[-1],))
    # k now has modes in reverse order in front: (K_{N-1}, ..., K_0, C, T, R)
    k = k.sum(-1)
    n = len(modes)
    return np.transpose(k, tuple(range(n - 1, -1, -1)) + (n, n + 1))


def np_conv(x, w, strides, pads, dil):
    """Direct numpy cross-correlation, channels-last, kernel (*K, C_in, C_out)."""
    n = w.ndim - 2
    xp = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
    ks = w.shape[:n]
    outs = [(xp.shape[i + 1] - dil[i] * (ks[i] - 1) - 1) // strides[i] + 1 for i in range(n)]
    y = np.zeros((x.shape[0], *outs, w.shape[-1]))
    for taps in itertools.product(*[range(k) for k in ks]):
        sl = tuple(slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s in zip(taps, dil, outs, strides))
        y += np.einsum("b...c,ct->b...t", xp[(slice(None),) + sl], w[taps])
    return y


def lax_pads(padding, in_sizes, ks, strides, dil):
    """Expected pads from lax's own helper (SAME) or PyTorch's rule, computed independently."""
    if padding == "SAME":
        eff = [d * (k - 1) + 1 for k, d in zip(ks, dil)]
        return lax.padtype_to_pads(in_sizes, eff, strides, "SAME")
    if padding == "VALID":
        return [(0, 0)] * len(ks)
    if padding == "SYMMETRIC":
        return [(d * (k - 1) // 2,) * 2 for k, d in zip(ks, dil)]
    if isinstance(padding, int):
        return [(padding, padding)] * len(ks)
    return [tuple(p) for p in padding]


CASES = [
    # (spatial sizes, kernel sizes, stride, dilation, padding)
    ((9,), (3,), 1, 1, "SAME"),
    ((8,), (4,), 2, 1, "SAME"),
    ((8,), (3,), 2, 2, "SYMMETRIC"),
    ((7, 8), (3, 3), 1, 1, "SAME"),
    ((8, 8), (3, 3), 2, 1, "SAME"),
    ((8, 8), (3, 3), 2, 1, "SYMMETRIC"),
    ((8, 7), (3, 2), (2, 1), 1, 1),
    ((9, 8), (3, 3), 1, 2, "VALID"),
    ((7, 6), (3, 3), 2, (1, 2), ((0, 1), (2, 0))),
    ((4, 6, 5), (3, 3, 3), 1, 1, "SAME"),
    ((4, 6, 6), (3, 3, 3), 2, 1, "SYMMETRIC"),
    ((5, 6, 7), (3, 1, 3), (1, 2, 2), (2, 1, 1), "SAME"),
    ((3, 4, 4, 5), (3, 3, 2, 3), 1, 1, "SAME"),
    ((4, 4, 3, 4), (3, 3, 3, 3), 2, 1, 1),
]


@pytest.mark.parametrize("sizes,ks,stride,dil,padding", CASES)
def test_cp_conv_matches_dense(sizes, ks, stride, dil, padding):
    n = len(sizes)
    modes = conv.default_modes(n)
    kx, kp = jax.random.split(jax.random.key(n + len(str(padding))))
    c_in, c_out, rank = 3, 5, 4
    x = jax.random.normal(kx, (2, *sizes, c_in))
    p = init.init_cp_params(kp, c_in, c_out, ks, rank, modes=modes, gain=10.0)
    p["lambda"] = jnp.linspace(0.5, 2.0, rank)
    strides = (stride,) * n if isinstance(stride, int) else stride
    dils = (dil,) * n if isinstance(dil, int) else dil
    pads = lax_pads(padding, sizes, ks, strides, dils)
    w = np_kernel(p, modes)
    expected = np_conv(np.asarray(x, np.float64), w, strides, pads, dils)
    # the lax oracle with lax's own padding string where there is one
    lax_padding = padding if padding in ("SAME", "VALID") else pads
    np.testing.assert_allclose(resolve_padding(padding, sizes, ks, strides, dils), pads)
    for impl, per_sample in [(i, None) for i in conv.IMPLEMENTATIONS] + [("factorized", True), ("factorized", False)]:
        y = conv.cp_conv(x, p, modes=modes, stride=stride, padding=padding, dilation=dil, implementation=impl,
                         per_sample=per_sample)
        assert y.shape == expected.shape
        np.testing.assert_allclose(y, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    np.testing.assert_allclose(conv.cp_to_kernel(p, modes), w, rtol=1e-5, atol=1e-6)
    y_lax = conv_ops.dense_conv(x, jnp.asarray(w, jnp.float32), stride=stride, padding=lax_padding, dilation=dil)
    np.testing.assert_allclose(y_lax, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


@pytest.mark.parametrize("sizes,ks,stride,dil,padding", CASES)
def test_matmul_kernel_gradient_matches_lax_autodiff(sizes, ks, stride, dil, padding):
    """``conv_matmul_kernel_grad`` (the reconstructed CP path's conv): value, kernel gradient (its own
    per-tap matrix products) and input gradient equal those of ``lax``'s conv differentiated by JAX
    (XLA's kernel-gradient convolution), on every stride/dilation/padding case, 1-D to 4-D."""
    n = len(sizes)
    rng = np.random.default_rng(7 * n + len(str(padding)))  # NumPy: jax.random compiles per shape (seconds)
    x = rng.standard_normal((2, *sizes, 3), np.float32)
    kernel = rng.standard_normal((*ks, 3, 5), np.float32)
    strides = (stride,) * n if isinstance(stride, int) else stride
    dils = (dil,) * n if isinstance(dil, int) else dil
    pads = resolve_padding(padding, sizes, ks, strides, dils)

    def lax_conv(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, pads, rhs_dilation=dils,
                                            dimension_numbers=("N" + "HWDT"[:n] + "C", "HWDT"[:n] + "IO", "N" + "HWDT"[:n] + "C"))

    def value_and_vjp(f):  # jitted: eagerly, each tap's slice and product would compile on its own
        return jax.jit(lambda x, k, g: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(f, x, k)))

    ours = value_and_vjp(lambda x, k: conv_ops.conv_matmul_kernel_grad(x, k, strides=strides, pads=pads, dilations=dils))
    g = rng.standard_normal(jax.eval_shape(lax_conv, x, kernel).shape, np.float32)
    (y, grads), (y_ref, grads_ref) = ours(x, kernel, g), value_and_vjp(lax_conv)(x, kernel, g)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("sizes,ks,stride,dil,padding", CASES + [((6, 5), (3, 2), 1, (1, 2), ((3, 2), (0, 4)))])
def test_depthwise_conv_matches_lax_grouped_conv(sizes, ks, stride, dil, padding):
    """``depthwise_conv`` (the shift kernel and its custom VJP): value, input and kernel gradients
    equal those of ``lax``'s grouped conv (``feature_group_count=R``) differentiated by JAX, on every
    stride/dilation/padding case, 1-D to 4-D, and pads wider than the kernel reaches."""
    n = len(sizes)
    rng = np.random.default_rng(11 * n + len(str(padding)))
    h = rng.standard_normal((2, *sizes, 4), np.float32)
    kernel = rng.standard_normal((*ks, 4), np.float32)
    strides = (stride,) * n if isinstance(stride, int) else stride
    dils = (dil,) * n if isinstance(dil, int) else dil
    pads = lax_pads(padding, sizes, ks, strides, dils)

    def grouped(h, k):
        spec = "HWDT"[:n]
        return jax.lax.conv_general_dilated(h, k[..., None, :], strides, pads, rhs_dilation=dils, feature_group_count=4,
                                            dimension_numbers=("N" + spec + "C", spec + "IO", "N" + spec + "C"))

    def value_and_vjp(f):
        return jax.jit(lambda h, k, g: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(f, h, k)))

    ours = value_and_vjp(lambda h, k: conv_ops.depthwise_conv(h, k, stride=stride, padding=padding, dilation=dil))
    g = rng.standard_normal(jax.eval_shape(grouped, h, kernel).shape, np.float32)
    (y, grads), (y_ref, grads_ref) = ours(h, kernel, g), value_and_vjp(grouped)(h, kernel, g)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("x_shape, k_shape, kwargs, route", [
    ((2, 7, 6, 5), (1, 1, 5, 3), dict(window_strides=(1, 1), padding="SAME"), "pointwise"),
    ((2, 7, 6, 5), (1, 1, 5, 3), dict(window_strides=(2, 2), padding=((1, 1), (0, 2))), "pointwise"),
    ((2, 8, 8, 5), (1, 1, 5, 3), dict(window_strides=(2, 1), padding="VALID"), "pointwise"),
    ((2, 3, 6, 6, 4), (1, 1, 1, 4, 6), dict(window_strides=(1, 2, 2), padding=((0, 0),) * 3,
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC")), "pointwise"),
    ((2, 8, 8, 6), (3, 3, 1, 6), dict(window_strides=(2, 2), padding=((1, 1), (1, 1)), feature_group_count=6), "depthwise"),
    ((2, 8, 7, 6), (3, 2, 1, 6), dict(window_strides=(1, 2), padding="SAME", rhs_dilation=(2, 1), feature_group_count=6),
     "depthwise"),
    ((2, 4, 6, 6, 4), (3, 3, 3, 1, 4), dict(window_strides=(1, 2, 2), padding="SAME", feature_group_count=4,
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC")), "depthwise"),
    ((2, 4, 7, 6, 3), (3, 3, 3, 3, 5), dict(window_strides=(1, 2, 2), padding="SAME",
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC")), "patches"),
    ((1, 5, 9, 8, 2), (3, 5, 4, 2, 4), dict(window_strides=(2, 1, 3), padding=((1, 1), (2, 2), (0, 3)),
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC")), "patches"),
    ((2, 6, 6, 5, 1), (2, 3, 3, 1, 3), dict(window_strides=(1, 1, 1), padding="VALID", rhs_dilation=(2, 1, 2),
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC")), "patches"),
    ((1, 3, 4, 5, 4, 4), (2, 3, 3, 2, 4, 3), dict(window_strides=(1, 1, 2, 1), padding="SAME",
                                                  dimension_numbers=("NTDHWC", "TDHWIO", "NTDHWC")), "patches"),
    ((2, 2, 2, 6), (3, 3, 6, 5), dict(window_strides=(1, 1), padding="SAME"), "taps"),  # a map smaller than the kernel
    ((2, 1, 3, 4), (5, 5, 4, 3), dict(window_strides=(1, 2), padding=((2, 2), (2, 2))), "taps"),
    ((2, 4, 4, 4), (3, 3, 4, 3), dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 1)), "taps"),
    ((2, 2, 5, 5, 6), (3, 3, 3, 6, 4), dict(window_strides=(1, 1, 1), padding=((1, 1), (0, 2), (1, 1)),
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC")), "taps"),
    ((2, 3, 3, 6), (3, 3, 6, 5), dict(window_strides=(1, 1), padding="SAME"), "lax"),  # as large as the kernel
    ((2, 4, 6, 6, 5), (3, 3, 3, 5, 4), dict(window_strides=(1, 1, 1), padding="SAME",
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC")), "lax"),
    ((2, 7, 6, 3), (3, 3, 3, 4), dict(window_strides=(1, 1), padding="SAME"), "lax"),
    ((2, 7, 6, 4), (3, 3, 4, 3), dict(window_strides=(1, 1), padding="SAME"), "lax"),
    ((2, 7, 6, 4), (3, 3, 2, 6), dict(window_strides=(1, 1), padding="SAME", feature_group_count=2), "lax"),
    ((2, 7, 6, 4), (3, 3, 1, 8), dict(window_strides=(1, 1), padding="SAME", feature_group_count=4), "lax"),
    ((2, 7, 6, 4), (1, 1, 4, 3), dict(window_strides=(1, 1), padding=((0, 0), (0, 0)), lhs_dilation=(2, 2)), "lax"),
    ((2, 4, 7, 6), (3, 4, 1, 1), dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")),
     "lax"),
])
def test_conv_general_dilated_is_lax(x_shape, k_shape, kwargs, route):
    """The drop-in for ``lax.conv_general_dilated``: values, input and kernel gradients equal lax's,
    pointwise and depthwise channels-last kernels, and ungrouped ones on maps smaller than the
    kernel, leave no convolution in the program, and every other case is lax's own conv."""
    kwargs = {"dimension_numbers": NHWC} | kwargs
    rng = np.random.default_rng(len(str(kwargs)))
    x = rng.standard_normal(x_shape, np.float32)
    k = rng.standard_normal(k_shape, np.float32)

    def value_and_vjp(f):
        return jax.jit(lambda x, k, g: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(f, x, k)))

    ours = functools.partial(conv_ops.conv_general_dilated, **kwargs)
    ref = functools.partial(jax.lax.conv_general_dilated, **kwargs)
    g = rng.standard_normal(jax.eval_shape(ref, x, k).shape, np.float32)
    (y, grads), (y_ref, grads_ref) = value_and_vjp(ours)(x, k, g), value_and_vjp(ref)(x, k, g)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    route = route if jax.default_backend() == "cpu" else "lax"  # GPU/TPU: every conv is lax's (next test)
    has_conv = "conv_general_dilated" in str(jax.make_jaxpr(ours)(x, k))
    assert has_conv == (route == "lax")
    assert conv_ops.conv_route(x, k, **kwargs) == (None if route == "lax" else route)


def test_taps_leave_out_taps_that_read_padding_only():
    """On a map smaller than the kernel most taps read zero padding only: the taps route leaves
    them out (a 1x1 map under a 5x5 kernel: one product; a 1-frame clip under a 3-frame kernel with
    padding 1: one of three frames' taps), and the value and gradients are still lax's (float64),
    also where no output position reads the input."""
    cases = [((2, 1, 1, 3), (5, 5, 3, 4), (1, 1), ((2, 2), (2, 2)), (1, 1), 1),
             ((2, 1, 3, 3, 3), (3, 3, 3, 3, 4), (1, 1, 1), ((1, 1),) * 3, (1, 1, 1), 9),
             ((2, 2, 4, 3), (3, 3, 3, 4), (1, 3), ((0, 3), (3, 0)), (1, 1), 6),
             ((2, 1, 3), (1, 3, 4), (2,), ((1, 1),), (1,), 0)]
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        for x_shape, k_shape, strides, pads, dilations, reading in cases:
            n = len(strides)
            x, k = rng.standard_normal(x_shape), rng.standard_normal(k_shape)
            outs = [conv.output_size(*a) for a in zip(x_shape[1:-1], k_shape[:n], strides, dilations, pads)]
            assert sum(conv_ops._taps_read_input(x_shape[1:-1], k_shape[:n], strides, pads, dilations, outs)) == reading
            ref = lambda x, k: lax.conv_general_dilated(x, k, strides, pads, rhs_dilation=dilations,  # noqa: E731
                                                        dimension_numbers=conv_ops.channels_last_dims(n))
            ours = lambda x, k: conv_ops._taps_conv(x, k, strides, pads, dilations)  # noqa: E731
            y, vjp = jax.vjp(ref, x, k)
            y2, vjp2 = jax.vjp(ours, x, k)
            g = rng.standard_normal(y.shape)
            assert str(jax.make_jaxpr(ours)(x, k)).count("dot_general") == max(reading, 0)
            for got, want in zip((y2, *vjp2(g)), (y, *vjp(g))):
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_small_map_taps_on_computed_kernels_with_one_concatenate_as_kernel_gradient():
    """On a map smaller than its kernel the reconstructed CP and Tucker paths run the taps too: no
    convolution left, values and gradients (input and every factor) equal to ``lax``'s conv of
    the reconstructed kernel in float64; the taps' kernel gradient is one concatenate, not a sum
    of zero-padded full kernels (the transpose of indexing each tap, 1.7x slower on Jester conv4's
    reconstructed path: ``conv_ops._taps_conv``)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the small-map taps are CPU-only")
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 2, 3, 4)), jnp.float64)
        cp = jax.tree.map(lambda a: a.astype(jnp.float64), init.init_cp_params(jax.random.PRNGKey(0), 4, 6, (3, 5), 5))
        tk = {"core": jnp.asarray(rng.standard_normal((3, 5, 3, 2))), "factor_in": jnp.asarray(rng.standard_normal((4, 3))),
              "factor_out": jnp.asarray(rng.standard_normal((6, 2)))}
        pads = ((1, 1), (2, 2))
        for params, ours, to_kernel in (
                (cp, lambda x, p: conv.cp_conv(x, p, padding=pads, implementation="reconstructed"),
                 lambda p: conv.cp_to_kernel(p, conv.default_modes(2))),
                (tk, lambda x, p: conv.tucker_conv(x, p, padding=pads, implementation="reconstructed"), conv.tucker_to_kernel)):
            def ref(x, p):
                return lax.conv_general_dilated(x, to_kernel(p), (1, 1), pads, dimension_numbers=NHWC)

            assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, params))
            y, vjp = jax.vjp(ref, x, params)
            y2, vjp2 = jax.vjp(ours, x, params)
            g = jnp.asarray(rng.standard_normal(y.shape))
            for got, want in zip(jax.tree.leaves((y2, vjp2(g))), jax.tree.leaves((y, vjp(g)))):
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    k = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 2, 2, 4)), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda k: conv_ops._taps_conv(x, k, (1, 1), ((1, 1), (1, 1)), (1, 1)).sum()))(k)
    prims = [e.primitive.name for e in jaxpr.eqns]
    assert prims.count("concatenate") == 1
    assert not [e for e in jaxpr.eqns if e.primitive.name == "pad" and e.outvars[0].aval.shape[0] == 9]


def test_small_map_taps_not_on_negative_pads():
    """The drop-in leaves a conv with a negative pad (a crop) or no output to ``lax`` and sums an
    integer conv's taps exactly."""
    if jax.default_backend() != "cpu":
        pytest.skip("the small-map taps are CPU-only")
    rng = np.random.default_rng(1)
    k = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
    for x_shape, kwargs in (((2, 2, 4, 4), dict(window_strides=(1, 1), padding=((1, 1), (2, -1)))),
                            ((2, 1, 1, 4), dict(window_strides=(1, 1), padding="VALID"))):  # no output
        x, kwargs = jnp.asarray(rng.standard_normal(x_shape), jnp.float32), kwargs | dict(dimension_numbers=NHWC)
        assert conv_ops.conv_route(x, k, **kwargs) == "taps"  # the route; the pads send it back to lax
        ours = conv_ops.conv_general_dilated(x, k, **kwargs)
        assert "conv_general_dilated" in str(jax.make_jaxpr(lambda x, k: conv_ops.conv_general_dilated(x, k, **kwargs))(x, k))
        np.testing.assert_allclose(ours, lax.conv_general_dilated(x, k, **kwargs), rtol=1e-5, atol=1e-5)
    xi, ki = jnp.full((1, 2, 2, 2), 2 ** 13 + 1, jnp.int32), jnp.full((3, 3, 2, 3), 2 ** 11 + 1, jnp.int32)
    np.testing.assert_array_equal(conv_ops.conv_general_dilated(xi, ki, (1, 1), "SAME", dimension_numbers=NHWC),
                                  lax.conv_general_dilated(xi, ki, (1, 1), "SAME", dimension_numbers=NHWC))


def test_routed_depthwise_conv_has_lax_tangents_and_hessian_vector_products():
    """The depthwise route (the shift kernel, a custom JVP whose tangent map is its backward pass
    transposed): ``jax.jvp`` through it and forward-over-reverse (a Hessian-vector product of a
    loss w.r.t. the input and the kernel) equal lax's grouped conv's."""
    rng = np.random.default_rng(3)
    x, k = rng.standard_normal((2, 7, 6, 4), np.float32), rng.standard_normal((3, 3, 1, 4), np.float32)
    vx, vk = rng.standard_normal(x.shape, np.float32), rng.standard_normal(k.shape, np.float32)
    kwargs = dict(window_strides=(2, 1), padding=((1, 1), (1, 1)), dimension_numbers=NHWC, feature_group_count=4)

    def hvp(conv_fn):
        loss = lambda x, k: jnp.sum(jnp.tanh(conv_fn(x, k, **kwargs)) ** 2)
        return jax.jvp(jax.grad(loss, argnums=(0, 1)), (x, k), (vx, vk))[1]

    def tangent(conv_fn):
        return jax.jvp(lambda x, k: conv_fn(x, k, **kwargs), (x, k), (vx, vk))[1]

    np.testing.assert_allclose(tangent(conv_ops.conv_general_dilated), tangent(jax.lax.conv_general_dilated),
                               rtol=1e-5, atol=1e-5)
    for got, want in zip(hvp(conv_ops.conv_general_dilated), hvp(jax.lax.conv_general_dilated)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_depthwise_pass_of_bfloat16_input_and_float32_factor():
    """The CP path's depthwise pass of a bfloat16 ``h`` (after a bfloat16 psi) with a float32
    factor: value, gradients and tangent in float32 (the promoted type), within bfloat16's
    rounding of ``h`` of a grouped ``lax`` conv of the upcast input."""
    rng = np.random.default_rng(11)
    h = jnp.asarray(rng.standard_normal((2, 7, 6, 5)), jnp.bfloat16)
    factor = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    th = jnp.asarray(rng.standard_normal(h.shape), jnp.bfloat16)
    tf = jnp.asarray(rng.standard_normal(factor.shape), jnp.float32)

    def ours(h, f):
        return conv_ops.depthwise_conv_1d(h, f, 1, stride=2, pad=(1, 1), dilation=1)

    def ref(h, f):
        return lax.conv_general_dilated(h.astype(jnp.float32), f.reshape(3, 1, 1, 5), (2, 1), ((1, 1), (0, 0)),
                                        dimension_numbers=NHWC, feature_group_count=5)

    y, dy = jax.jvp(ours, (h, factor), (th, tf))
    assert y.dtype == dy.dtype == jnp.float32
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    grads = jax.vjp(ours, h, factor)[1](g)
    assert [a.dtype for a in grads] == [jnp.bfloat16, jnp.float32]
    y_ref, dy_ref = jax.jvp(ref, (h, factor), (th, tf))
    for got, want in zip((y, dy, *grads), (y_ref, dy_ref, *jax.vjp(ref, h, factor)[1](g))):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)


DEPTHWISE_CASES = [  # h shape, kernel shape, stride, explicit padding, dilation
    ((2, 9, 12, 5), (3, 1, 5), (1, 1), ((1, 1), (0, 0)), (1, 1)),  # a CP path's 1-D pass
    ((2, 9, 12, 5), (1, 3, 5), (1, 2), ((0, 0), (0, 1)), (1, 1)),  # strided, lax SAME on an even size
    ((2, 9, 12, 5), (3, 1, 5), (1, 1), ((2, 2), (0, 0)), (2, 1)),  # dilated
    ((2, 9, 12, 5), (3, 3, 5), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # MobileNet's strided 3x3
    ((2, 9, 12, 5), (3, 3, 5), (1, 1), ((3, 0), (0, 2)), (1, 1)),  # pads past the kernel's reach
    ((1, 4, 5, 6, 3), (3, 2, 3, 3), (1, 2, 1), ((1, 1), (0, 1), (2, 0)), (1, 1, 2)),  # 3-D, mixed
]


@pytest.mark.parametrize("h_shape,k_shape,stride,padding,dilation", DEPTHWISE_CASES)
def test_depthwise_conv_tangent_matches_grouped_lax_conv(h_shape, k_shape, stride, padding, dilation):
    rng = np.random.default_rng(sum(h_shape))
    n = len(k_shape) - 1
    with jax.enable_x64(True):
        h, k, th, tk = (rng.standard_normal(s) for s in (h_shape, k_shape, h_shape, k_shape))

        def ref(h, k):
            return lax.conv_general_dilated(h, k.reshape(k.shape[:n] + (1, k.shape[-1])), stride, padding,
                                            rhs_dilation=dilation, dimension_numbers=conv_ops.channels_last_dims(n),
                                            feature_group_count=k.shape[-1])

        def ours(h, k):
            return conv_ops.depthwise_conv(h, k, stride=stride, padding=padding, dilation=dilation)

        for got, want in zip(jax.jvp(ours, (h, k), (th, tk)), jax.jvp(ref, (h, k), (th, tk))):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_patches_route_keeps_lax_conv_above_its_byte_bound(monkeypatch):
    """A conv whose patches would exceed ``conv_plans.PATCHES_MAX_BYTES`` (estimated per device as
    ``B * prod(ceil(S / stride)) * prod(K) * C_in`` elements) stays ``lax``'s, in the drop-in and in
    the reconstructed CP path; at the bound it is routed."""
    x, k = jnp.ones((2, 4, 6, 6, 3)), jnp.ones((3, 3, 3, 3, 8))
    kwargs = dict(window_strides=(1, 2, 2), padding="SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    patches_bytes = 2 * 4 * 3 * 3 * 27 * 3 * 4
    cp = init.init_cp_params(jax.random.PRNGKey(0), 3, 8, (3, 3, 3), 5)

    def programs():
        recon = lambda x: conv.cp_conv(x, cp, stride=(1, 2, 2), implementation="reconstructed")
        return str(jax.make_jaxpr(lambda x, k: conv_ops.conv_general_dilated(x, k, **kwargs))(x, k)), str(jax.make_jaxpr(recon)(x))

    if jax.default_backend() != "cpu":
        pytest.skip("the patches route is CPU-only")
    for bound, route in ((patches_bytes, "patches"), (patches_bytes - 1, None)):
        monkeypatch.setattr(conv_plans, "PATCHES_MAX_BYTES", bound)
        assert conv_ops.conv_route(x, k, **kwargs) == route
        assert all(("conv_general_dilated" in p) == (route is None) for p in programs())


def test_patches_route_in_bfloat16_stays_near_float32():
    """bfloat16 operands on the patches route: a bfloat16 output within bfloat16 rounding of the
    float32 ``lax`` conv of the same values, and a bfloat16 kernel gradient near the float32 one."""
    rng = np.random.default_rng(5)
    x, k = rng.standard_normal((2, 4, 8, 8, 3), np.float32), rng.standard_normal((3, 3, 3, 3, 6), np.float32)
    kwargs = dict(window_strides=(1, 2, 2), padding="SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    x16, k16 = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda k: conv_ops.conv_general_dilated(x16, k, **kwargs), k16)
    y_ref, vjp_ref = jax.vjp(lambda k: jax.lax.conv_general_dilated(x16.astype(np.float32), k, **kwargs),
                             k16.astype(np.float32))
    g = rng.standard_normal(y.shape, np.float32)
    dk, dk_ref = vjp(g.astype(jnp.bfloat16))[0], vjp_ref(g)[0]
    assert y.dtype == dk.dtype == jnp.bfloat16
    for got, want in ((y, y_ref), (dk, dk_ref)):
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=3e-2, atol=3e-2 * float(jnp.abs(want).max()))


def jitted_value_and_grads(f, g, *args):
    """``(f(*args), the gradients of <f, g>)`` as one jitted program: many slices and products run
    eagerly would dispatch (and compile) one at a time."""
    return jax.jit(lambda *a: (lambda y, pull: (y, pull(g)))(*jax.vjp(f, *a)))(*args)


@pytest.mark.parametrize("x_shape, k_shape, strides, pads, dilations", [
    ((2, 5, 9, 8, 3), (3, 7, 7, 3, 4), (1, 2, 2), ((1, 1), (3, 3), (3, 3)), (1, 1, 1)),  # a video stem
    ((1, 9, 6, 5, 2), (3, 3, 2, 2, 3), (2, 1, 1), ((2, 0), (1, 1), (0, 1)), (2, 1, 1)),  # first-mode stride, dilation
    ((2, 4, 5, 6, 1), (2, 3, 3, 1, 2), (1, 1, 2), ((0, 1), (1, 1), (1, 1)), (1, 2, 1)),
    ((1, 3, 4, 5, 4, 2), (2, 3, 3, 2, 2, 3), (1, 1, 2, 1), ((1, 0), (1, 1), (1, 1), (0, 1)), (1, 1, 1, 1)),
])
def test_patches_product_split_by_the_first_modes_taps_is_lax(x_shape, k_shape, strides, pads, dilations):
    """The patches product with the split by the first mode's taps forced on (one matrix product
    per such tap on its slice of the in-plane patches) and off (one product of the full patches):
    value, input and kernel gradients equal ``lax``'s conv in float64, with the number of
    products the split says in the forward program."""
    n = len(strides)
    rng = np.random.default_rng(sum(x_shape))
    with jax.enable_x64(True):
        x, k = rng.standard_normal(x_shape), rng.standard_normal(k_shape)
        ref = lambda x, k: lax.conv_general_dilated(x, k, strides, pads, rhs_dilation=dilations,  # noqa: E731
                                                    dimension_numbers=conv_ops.channels_last_dims(n))
        g = rng.standard_normal(jax.eval_shape(ref, x, k).shape)
        y_ref, vjp_ref = jax.vjp(ref, x, k)
        for split in (True, False):
            with conv_plans.patches_split_mode(split):  # (read at trace time: jitted, a program per split)
                f = lambda x, k: conv_ops._patches_conv(x, k, strides, pads, dilations)  # noqa: E731
                y, grads = jitted_value_and_grads(f, g, x, k)
                products = str(jax.make_jaxpr(f)(x, k)).count("dot_general")
            assert products == (k_shape[0] if split else 1)
            np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
            for got, want in zip(grads, vjp_ref(g)):
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_conv_general_dilated_leaves_gpu_and_tpu_convs_to_lax(monkeypatch):
    """Off the CPU backend the drop-in routes nothing: the pointwise and depthwise convs stay lax's."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x = jnp.ones((2, 8, 8, 4))
    for k, groups in ((jnp.ones((1, 1, 4, 6)), 1), (jnp.ones((3, 3, 1, 4)), 4)):
        f = functools.partial(conv_ops.conv_general_dilated, window_strides=(1, 1), padding="SAME",
                              dimension_numbers=NHWC, feature_group_count=groups)
        assert "conv_general_dilated" in str(jax.make_jaxpr(f)(x, k))
    f = functools.partial(conv_ops.conv_general_dilated, window_strides=(1, 1, 1), padding="SAME",
                          dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    assert "conv_general_dilated" in str(jax.make_jaxpr(f)(jnp.ones((2, 4, 6, 6, 3)), jnp.ones((3, 3, 3, 3, 5))))


@pytest.mark.parametrize("h_shape, kernel_shape, kwargs, match", [
    ((2, 8, 8, 4), (3, 3, 5), {}, r"h: got shape \(2, 8, 8, 4\) for a depthwise kernel of shape \(3, 3, 5\)"),
    ((2, 8, 4), (3, 3, 4), {}, r"expected \(B, 2 spatial sizes, 4 channels\)"),
    ((2, 8, 8, 4), (3, 3, 4), {"stride": (1, 2, 1)}, "stride"),
    ((2, 8, 8, 4), (3, 3, 4), {"padding": "FULL"}, "padding"),
])
def test_depthwise_conv_rejects_bad_arguments(h_shape, kernel_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        conv_ops.depthwise_conv(jnp.ones(h_shape), jnp.ones(kernel_shape), **kwargs)


def test_matmul_kernel_gradient_keeps_the_kernel_dtype_and_sums_in_float32():
    """bfloat16 operands: the kernel gradient comes back bfloat16 and within bfloat16 rounding of
    the float32 one (its products over the 2 x 32 x 32 positions summed in float32)."""
    rng = np.random.default_rng(0)
    x, kernel = rng.standard_normal((2, 32, 32, 4), np.float32), rng.standard_normal((3, 3, 4, 8), np.float32)
    pads = ((1, 1), (1, 1))

    @functools.partial(jax.jit, static_argnums=0)
    def kernel_grad(dtype):
        f = lambda k: conv_ops.conv_matmul_kernel_grad(x.astype(dtype), k, strides=(1, 1), pads=pads, dilations=(1, 1))
        y, vjp = jax.vjp(f, kernel.astype(dtype))
        return vjp(jnp.ones_like(y))[0]

    got, want = kernel_grad(jnp.bfloat16), kernel_grad(jnp.float32)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2e-2, atol=2e-2 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("x_shape, kernel_dtype, kwargs, match", [
    ((2, 6, 6), jnp.float32, {}, "x: got shape"),
    ((2, 6, 6, 4), jnp.float32, {}, "x: got shape"),
    ((2, 6, 6, 3), jnp.float32, {"strides": (1,)}, "strides="),
    ((2, 6, 6, 3), jnp.float32, {"pads": ((1, 1),)}, "pads="),
    ((2, 6, 6, 3), jnp.bfloat16, {}, "dtype"),
])
def test_matmul_kernel_gradient_conv_rejects_bad_arguments(x_shape, kernel_dtype, kwargs, match):
    args = {"strides": (1, 1), "pads": ((1, 1), (1, 1)), "dilations": (1, 1)} | kwargs
    with pytest.raises(ValueError, match=match):
        conv_ops.conv_matmul_kernel_grad(jnp.ones(x_shape), jnp.ones((3, 3, 3, 5), kernel_dtype), **args)


@pytest.mark.parametrize("by_taps", [True, False])
@pytest.mark.parametrize("form", ["tucker", "tt"])
def test_tucker_and_tt_gradients_match_autodiff_of_the_dense_conv(monkeypatch, by_taps, form):
    """Both paths of the Tucker and TT convs, with the kernel gradient as matrix products per tap or
    as XLA's (``conv_plans.matmul_kernel_grad``): value and gradients w.r.t. input and every
    parameter equal JAX's autodiff of ``lax``'s conv of the kernel rebuilt by an einsum written
    here (stride 2 on an even size, symmetric padding)."""
    from hocp_jax import conv_plans, layer_specs

    monkeypatch.setattr(conv_plans, "matmul_kernel_grad", lambda *_: by_taps)
    rng = np.random.default_rng(3)
    specs = (layer_specs.tucker_specs(4, 5, (3, 3), (3, 2)) if form == "tucker"
             else layer_specs.tt_conv_specs(4, 5, (3, 3), (2, 3, 2)))
    p = {k: jnp.asarray(rng.standard_normal(shape), jnp.float32) for k, (shape, _) in specs.items()}
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    f = conv.tucker_conv if form == "tucker" else conv.tt_conv

    def kernel(p):
        if form == "tucker":
            return jnp.einsum("hwab,ca,tb->hwct", p["core"], p["factor_in"], p["factor_out"])
        return jnp.einsum("xca,ahb,bwd,dty->hwct", p["core_0"], p["core_1"], p["core_2"], p["core_3"])

    def oracle(x, p):
        return jax.lax.conv_general_dilated(x, kernel(p), (2, 2), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    g = jnp.asarray(rng.standard_normal((2, 4, 4, 5)), jnp.float32)
    want_y, want_vjp = jax.vjp(oracle, x, p)
    want = want_vjp(g)
    for impl in ("factorized", "reconstructed"):
        y, vjp = jax.vjp(jax.jit(lambda x, p: f(x, p, stride=2, padding=1, implementation=impl)), x, p)
        np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4 * float(jnp.abs(want_y).max()))
        for got, ref in zip(jax.tree.leaves(vjp(g)), jax.tree.leaves(want)):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def test_same_vs_symmetric_stride2_even():
    """lax SAME pads (0, 1), PyTorch-style pads (1, 1) at stride 2, k=3, even size."""
    assert resolve_padding("SAME", (8,), (3,), (2,), (1,)) == ((0, 1),)
    assert resolve_padding("SYMMETRIC", (8,), (3,), (2,), (1,)) == ((1, 1),)
    assert resolve_padding(1, (8,), (3,), (2,), (1,)) == ((1, 1),)
    x = jnp.arange(8.0).reshape(1, 8, 1)
    p = {"lambda": jnp.ones(1), "factor_in": jnp.ones((1, 1)), "factor_out": jnp.ones((1, 1)), "factor_w": jnp.ones((3, 1))}
    # SAME: windows [0..2], [2..4], [4..6], [6,7,pad]
    np.testing.assert_allclose(conv.cp_conv(x, p, modes=("w",), stride=2, padding="SAME")[0, :, 0], [3, 9, 15, 13])
    # PyTorch: windows [pad,0,1], [1..3], [3..5], [5..7]
    np.testing.assert_allclose(conv.cp_conv(x, p, modes=("w",), stride=2, padding=1)[0, :, 0], [1, 6, 12, 18])


def test_mode_order_and_skip_and_bias():
    key = jax.random.key(1)
    x = jax.random.normal(key, (2, 6, 7, 4))
    p = init.init_cp_params(key, 4, 4, (3, 3), 6, skip=True, bias=True)
    p["bias"] = jnp.arange(4.0)
    y1 = conv.cp_conv(x, p, modes=("h", "w"), stride=2)
    y2 = conv.cp_conv(x, p, modes=("h", "w"), stride=2, mode_order=("w", "h"))
    y3 = conv.cp_conv(x, p, modes=("h", "w"), stride=2, implementation="reconstructed")
    w = np_kernel(p, ("h", "w"))
    pads = lax_pads("SAME", (6, 7), (3, 3), (2, 2), (1, 1))
    expected = np_conv(np.asarray(x), w, (2, 2), pads, (1, 1))
    expected += np.einsum("bhwc,ct->bhwt", np.asarray(x)[:, ::2, ::2], np.asarray(p["factor_skip"])) + np.arange(4.0)
    for y in (y1, y2, y3):
        np.testing.assert_allclose(y, expected, rtol=RTOL, atol=1e-5)


def test_psi_is_applied_between_factors():
    key = jax.random.key(2)
    x = jax.random.normal(key, (1, 5, 5, 2))
    p = init.init_cp_params(key, 2, 3, (3, 3), 4)
    stages = []

    def psi(h, stage):
        stages.append(stage)
        return jax.nn.relu(h)

    y = conv.cp_conv(x, p, modes=("h", "w"), psi=psi)
    assert stages == ["in", "h", "w"]
    h = jax.nn.relu(np.einsum("bhwc,cr->bhwr", x, p["factor_in"]))
    h = jax.nn.relu(np_conv_depthwise(np.asarray(h), np.asarray(p["factor_h"]), 1))
    h = jax.nn.relu(np_conv_depthwise(np.asarray(h), np.asarray(p["factor_w"]), 2))
    expected = np.einsum("bhwr,tr,r->bhwt", h, p["factor_out"], p["lambda"])
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=1e-5)
    with pytest.raises(ValueError, match="psi"):
        conv.cp_conv(x, p, modes=("h", "w"), psi=psi, implementation="reconstructed")


def np_conv_depthwise(h, f, axis):
    """'SAME' (k=3 -> pad 1) depthwise 1-D conv along axis, numpy."""
    k = f.shape[0]
    pad = [(0, 0)] * h.ndim
    pad[axis] = ((k - 1) // 2, k // 2)
    hp = np.pad(h, pad)
    out = np.zeros_like(h)
    for t in range(k):
        sl = [slice(None)] * h.ndim
        sl[axis] = slice(t, t + h.shape[axis])
        out += hp[tuple(sl)] * f[t]
    return out


def test_gradients_finite_differences():
    key = jax.random.key(3)
    with jax.enable_x64(True):
        x = jax.random.normal(key, (2, 5, 4, 2), jnp.float64)
        p = jax.tree.map(lambda a: a.astype(jnp.float64), init.init_cp_params(key, 2, 3, (3, 2), 3, skip=True))
        for per_sample in (False, True):
            def f(x, p, per_sample=per_sample):
                return conv.cp_conv(x, p, modes=("h", "w"), stride=(2, 1), padding="SAME", per_sample=per_sample)

            check_grads(f, (x, p), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
        check_grads(lambda x, p: conv.cp_conv(x, p, modes=("h", "w"), implementation="reconstructed"), (x, p), order=1, modes=("rev",))


def test_jit_and_vmap():
    key = jax.random.key(4)
    x = jax.random.normal(key, (3, 2, 6, 6, 2))
    p = init.init_cp_params(key, 2, 3, (3, 3), 4)
    f = jax.jit(lambda x, p: conv.cp_conv(x, p, modes=("h", "w"), stride=2))
    y = jax.vmap(f, in_axes=(0, None))(x, p)
    expected = np.stack([np.asarray(conv.cp_conv(xi, p, modes=("h", "w"), stride=2)) for xi in x])
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=1e-6)
    # vmap over params (an ensemble of layers)
    ps = jax.vmap(lambda k: init.init_cp_params(k, 2, 3, (3, 3), 4))(jax.random.split(key, 3))
    ye = jax.vmap(f, in_axes=(None, 0))(x[0], ps)
    assert ye.shape == (3, 2, 3, 3, 3)
    pads = lax_pads("SAME", (6, 6), (3, 3), (2, 2), (1, 1))
    for i in range(3):  # each member is its own layer (the batched factors reach the custom VJP's kernel)
        w = np_kernel(jax.tree.map(lambda a: a[i], ps), ("h", "w"))
        np.testing.assert_allclose(ye[i], np_conv(np.asarray(x[0]), w, (2, 2), pads, (1, 1)), rtol=RTOL, atol=1e-5)


def test_tucker_conv_matches_dense():
    key = jax.random.key(5)
    x = jax.random.normal(key, (2, 6, 5, 4))
    p = init.init_tucker_params(key, 4, 6, (3, 3), (3, 2))
    w = np.einsum("hwab,ca,tb->hwct", p["core"], p["factor_in"], p["factor_out"])
    pads = lax_pads("SAME", (6, 5), (3, 3), (2, 2), (1, 1))
    expected = np_conv(np.asarray(x), w, (2, 2), pads, (1, 1))
    for impl in ("factorized", "reconstructed"):
        y = conv.tucker_conv(x, p, stride=2, implementation=impl)
        np.testing.assert_allclose(y, expected, rtol=RTOL, atol=1e-5)


def test_mobilenet_is_cp_special_case():
    """MobileNet-v2 (1x1 expand, depthwise KxK, 1x1 project) == CP conv with merged spatial factor."""
    key = jax.random.key(6)
    x = jax.random.normal(key, (2, 7, 7, 3))
    p = init.init_cp_params(key, 3, 5, (3, 3), 6, gain=5.0)
    sep = conv.cp_to_separable(p, ("h", "w"))
    assert sep["depthwise"].shape == (3, 3, 6)
    y_cp = conv.cp_conv(x, p, modes=("h", "w"), stride=2, padding=1)
    y_sep = conv.separable_conv(x, sep, stride=2, padding=1)
    np.testing.assert_allclose(y_sep, y_cp, rtol=RTOL, atol=1e-5)
    # MobileNet v1: no expansion (R = C_in); equals a dense conv with kernel dw[..., c] * U_out[t, c]
    v1 = {"depthwise": sep["depthwise"][..., :3], "factor_out": sep["factor_out"][:, :3]}
    w = np.einsum("hwc,tc->hwct", v1["depthwise"], v1["factor_out"])
    expected = np_conv(np.asarray(x), w, (1, 1), [(1, 1), (1, 1)], (1, 1))
    np.testing.assert_allclose(conv.separable_conv(x, v1, padding="SAME"), expected, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x_shape=(2, 6, 6, 3), modes=("t", "h", "w")), "x: got shape"),
        (dict(x_shape=(2, 6, 6, 4)), "factor_in"),
        (dict(padding="FULL"), "padding"),
        (dict(stride=0), "stride"),
        (dict(implementation="fft"), "implementation"),
        (dict(modes=("h", "h")), "modes"),
        (dict(mode_order=("h",)), "mode_order"),
        (dict(drop="factor_w"), "missing CP leaves"),
        (dict(bad_rank=True), "factor_h"),
        (dict(x_shape=(1, 2, 2, 3), padding="VALID"), "kernel extent"),
        (dict(per_sample="yes"), "per_sample='yes'"),
        (dict(per_sample=1), "per_sample=1: expected None"),  # a flag, not a count (1 == True)
        (dict(psi_pointwise=None), "psi_pointwise=None"),
        (dict(psi_pointwise=0), "psi_pointwise=0: expected True or False"),
        # a 1-D x with 2-D params: without modes, factor_h would be silently ignored
        (dict(x_shape=(2, 6, 3), modes=None), r"factor leaves \['factor_h'\]"),
        (dict(bias=jnp.ones((1,))), r"params\['bias'\]: got shape \(1,\), expected \(4,\)"),
        (dict(stride=True), "stride=True"),
        (dict(rename=("bias", "bais"), bias=jnp.ones((4,))), r"unknown CP leaves \['bais'\]"),  # was: silently no bias
        (dict(zero_mode=True), r"params\['factor_h'\]: got shape \(0, 5\), expected \(size >= 1"),
        # were: accepted as True, a TypeError ('int' object is not callable), one mode per character, an
        # AttributeError ('list' object has no attribute 'shape'), and 'missing factor_d' with no word of the default
        (dict(input_grad="no"), "input_grad='no': expected True or False"),
        (dict(psi=3), "psi=3: expected None or a function"),
        (dict(modes="hw"), "modes='hw': expected a sequence of mode names"),
        (dict(listify="factor_in"), r"params\['factor_in'\]: got a list; expected an array"),
        (dict(x_shape=(2, 3, 6, 6, 3), modes=None), r"\[modes not given: x of shape \(2, 3, 6, 6, 3\) has 3 spatial modes, "
                                                   r"so modes=\('d', 'h', 'w'\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    key = jax.random.key(7)
    p = dict(init.init_cp_params(key, 3, 4, (3, 3), 5))
    if "drop" in kwargs:
        del p[kwargs.pop("drop")]
    if kwargs.pop("bad_rank", False):
        p["factor_h"] = jnp.ones((3, 4))
    if "bias" in kwargs:
        p["bias"] = kwargs.pop("bias")
    if "rename" in kwargs:
        old, new = kwargs.pop("rename")
        p[new] = p.pop(old)
    if kwargs.pop("zero_mode", False):
        p["factor_h"] = jnp.ones((0, 5))
    if "listify" in kwargs:
        name = kwargs.pop("listify")
        p[name] = np.asarray(p[name]).tolist()
    x = jnp.ones(kwargs.pop("x_shape", (2, 6, 6, 3)))
    kwargs.setdefault("modes", ("h", "w"))
    with pytest.raises(ValueError, match=match):
        conv.cp_conv(x, p, **kwargs)


def test_bad_init_arguments():
    with pytest.raises(ValueError, match="rank"):
        init.init_cp_params(jax.random.key(0), 3, 4, (3, 3), 0)
    with pytest.raises(ValueError, match="modes"):
        init.init_cp_params(jax.random.key(0), 3, 4, (3, 3), 2, modes=("t", "h", "w"))
    for modes in (("in", "w"), ("h", "h")):  # would overwrite factor_in / drop a factor
        with pytest.raises(ValueError, match="modes="):
            init.init_cp_params(jax.random.key(0), 3, 4, (3, 5), 2, modes=modes)
    with pytest.raises(ValueError, match="kernel_size=3"):
        init.init_cp_params(jax.random.key(0), 3, 4, 3, 2)
    with pytest.raises(ValueError, match="ranks=2"):
        init.init_tucker_params(jax.random.key(0), 3, 4, (3, 3), 2)
    for make in (init.init_cp_params, init.init_tucker_params):  # was: jax.random.normal's error
        with pytest.raises(ValueError, match="^dtype=.*int32.*: expected a floating dtype"):
            make(jax.random.key(0), 3, 4, (3, 3), 2 if make is init.init_cp_params else (2, 2), dtype=jnp.int32)


def test_numpy_ints_are_accepted_for_stride_padding_dilation():
    key = jax.random.key(9)
    x = jax.random.normal(key, (2, 8, 8, 3))
    p = init.init_cp_params(key, 3, 4, (3, 3), 5)
    want = conv.cp_conv(x, p, stride=2, padding=1, dilation=1)
    got = conv.cp_conv(x, p, stride=np.int64(2), padding=np.int32(1), dilation=(np.int64(1), 1))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("implementation", ["factorized", "reconstructed", "auto"])
def test_mixed_dtypes_promote_on_every_path(implementation):
    """bf16 x with f32 params: every path computes in the promoted dtype (as jnp does), close to
    the f32 dense conv of the reconstructed kernel; the reconstructed path used to hand lax's
    conv two dtypes (a TypeError that "auto" raised or not depending on the shape)."""
    key = jax.random.key(10)
    x = jax.random.normal(key, (2, 8, 8, 16)).astype(jnp.bfloat16)
    p = init.init_cp_params(key, 16, 8, (3, 3), 32)
    y = conv.cp_conv(x, p, implementation=implementation)
    assert y.dtype == jnp.float32
    w = np_kernel(p, ("h", "w"))
    expected = np_conv(np.asarray(x, np.float32), w, (1, 1), [(1, 1), (1, 1)], (1, 1))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    # and bf16 params with an f32 x: the kernel is rebuilt in float32 (it was rebuilt in bf16)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
    expected = np_conv(np.asarray(x, np.float32), np_kernel(jax.tree.map(lambda a: np.asarray(a, np.float32), p16),
                                                            ("h", "w")), (1, 1), [(1, 1), (1, 1)], (1, 1))
    y = conv.cp_conv(x.astype(jnp.float32), p16, implementation=implementation)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    tucker = init.init_tucker_params(key, 16, 8, (3, 3), (4, 4), dtype=jnp.bfloat16)
    t32 = jax.tree.map(lambda a: np.asarray(a, np.float32), tucker)
    w = np.einsum("hwab,ca,tb->hwct", t32["core"], t32["factor_in"], t32["factor_out"])
    expected = np_conv(np.asarray(x, np.float32), w, (1, 1), [(1, 1), (1, 1)], (1, 1))
    for impl in ("factorized", "reconstructed"):
        y = conv.tucker_conv(x.astype(jnp.float32), tucker, implementation=impl)
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()), err_msg=impl)


def test_separable_conv_checks_its_leaves():
    key = jax.random.key(11)
    x = jnp.ones((1, 8, 8, 3))
    sep = conv.cp_to_separable(init.init_cp_params(key, 3, 5, (3, 3), 6), ("h", "w"))
    with pytest.raises(ValueError, match=r"factor_in'\]: shape \(3, 6\) expects 3 input channels but x has 4"):
        conv.separable_conv(jnp.ones((1, 8, 8, 4)), sep)
    with pytest.raises(ValueError, match="factor_skip"):
        conv.separable_conv(x, sep | {"factor_skip": jnp.ones((3, 5))}, padding="VALID")
    with pytest.raises(ValueError, match="factor_out"):
        conv.separable_conv(x, sep | {"factor_out": jnp.ones((5, 4))})
    with pytest.raises(ValueError, match="bias"):
        conv.separable_conv(x, sep | {"bias": jnp.ones((2,))})


def test_unknown_leaves_of_tucker_tt_and_separable_convs_are_named():
    """Before: a misspelt 'bias', a CP-only 'factor_skip' or a TT core after a gap in the numbering
    was silently left out; a 1-D or 3-D separable factor_in failed unpacking its shape."""
    x = jax.ShapeDtypeStruct((1, 5, 5, 3), jnp.float32)
    tucker = dict(factor_in=jnp.ones((3, 2)), core=jnp.ones((3, 3, 2, 2)), factor_out=jnp.ones((4, 2)))
    tt = {"core_0": jnp.ones((1, 3, 2)), "core_1": jnp.ones((2, 3, 2)), "core_2": jnp.ones((2, 3, 2)),
          "core_3": jnp.ones((2, 4, 1))}
    sep = dict(factor_in=jnp.ones((3, 2)), depthwise=jnp.ones((3, 3, 2)), factor_out=jnp.ones((4, 2)))
    bias, skip = jnp.ones((4,)), jnp.ones((3, 4))
    for f, p in ((conv.tucker_conv, tucker | {"bias": bias}), (conv.tt_conv, tt | {"bias": bias}),
                 (conv.separable_conv, sep | {"bias": bias, "factor_skip": skip})):
        assert jax.eval_shape(f, x, p).shape == (1, 5, 5, 4)  # every leaf known: still runs
    for f, p, words in (
        (conv.tucker_conv, tucker | {"bais": bias},
         r"unknown Tucker leaves \['bais'\]; expected \['factor_in', 'core', 'factor_out'\] \(\+ optional bias\); "
         r"did you mean 'bias' for 'bais'\?"),
        (conv.tucker_to_kernel, tucker | {"factor_skip": skip}, r"unknown Tucker leaves \['factor_skip'\]"),
        (conv.tt_conv, tt | {"bais": bias}, r"unknown TT leaves \['bais'\].*did you mean 'bias'"),
        (conv.tt_conv, tt | {"core_5": jnp.ones((2, 4, 1))},
         r"unknown TT leaves \['core_5'\]; expected \['core_0', 'core_1', 'core_2', 'core_3'\]"),
        (conv.separable_conv, sep | {"bais": bias}, r"unknown separable leaves \['bais'\].*did you mean 'bias'"),
        (conv.separable_conv, sep | {"factor_in": jnp.ones((3,))},
         r"params\['factor_in'\]: got shape \(3,\), expected a 2-D \(C_in=3, R=2\)"),
        (conv.separable_conv, sep | {"factor_in": jnp.ones((3, 2, 1))}, r"params\['factor_in'\]: got shape \(3, 2, 1\)"),
    ):
        with pytest.raises(ValueError, match=words):
            f(p) if f is conv.tucker_to_kernel else jax.eval_shape(f, x, p)


def test_init_variance_matches_target():
    """Reconstructed-kernel variance of the CP init ~ He variance (statistical, wide tolerance)."""
    ks = jax.random.split(jax.random.key(8), 64)
    kernels = jax.vmap(lambda k: conv.cp_to_kernel(init.init_cp_params(k, 16, 16, (3, 3, 3), 32), ("d", "h", "w")))(ks)
    target = 2.0 / (16 * 27)
    assert 0.8 * target < float(jnp.var(kernels)) < 1.25 * target


def test_gpu_convs_of_four_modes_run_without_xla_convolution(monkeypatch):
    """On GPU, XLA's convs of more than three spatial modes abort or mis-compute their gradients
    (``conv_ops.GPU_CONV_MAX_MODES``): there the drop-in conv, the reconstructed CP path and the Tucker
    conv run them as slices and matrix products. Checked here on the CPU by reporting the GPU
    backend: no convolution in the gradient programs, and values, input and parameter gradients
    equal those of ``lax``'s convs of einsum-rebuilt kernels (on the CPU, where they are right);
    three modes stay ``lax``'s."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 5, 3, 4, 3), np.float32)
    kernel = rng.standard_normal((3, 2, 3, 2, 3, 4), np.float32)
    modes = conv.default_modes(4)
    cp = init.init_cp_params(jax.random.key(1), 3, 4, (3, 1, 2, 2), 5, modes=modes)
    tucker = init.init_tucker_params(jax.random.key(2), 3, 4, (3, 2, 3, 2), (2, 3))
    cases = {
        "dense": (lambda x, k: conv_ops.dense_conv(x, k, stride=(1, 2, 1, 1), padding="SAME", dilation=(1, 1, 1, 2)), kernel),
        "cp reconstructed": (lambda x, p: conv.cp_conv(x, p, modes=modes, stride=2, padding=1,
                                                       implementation="reconstructed"), cp),
        "tucker": (lambda x, p: conv.tucker_conv(x, p, padding="SAME"), tucker),
    }

    # the oracles: lax's conv of a kernel rebuilt with einsum (independent of the library's routes)
    dn = lax.ConvDimensionNumbers(lhs_spec=(0, 5, 1, 2, 3, 4), rhs_spec=(5, 4, 0, 1, 2, 3), out_spec=(0, 5, 1, 2, 3, 4))

    def lax_conv(x, k, stride, padding, dilation=(1, 1, 1, 1)):
        return lax.conv_general_dilated(x, k, stride, padding, rhs_dilation=dilation, dimension_numbers=dn,
                                        precision=lax.Precision.HIGHEST)

    def cp_kernel(p):
        return jnp.einsum("r,ar,br,cr,dr,ir,or->abcdio", p["lambda"], *(p[f"factor_{m}"] for m in modes),
                          p["factor_in"], p["factor_out"])

    oracles = {
        "dense": lambda x, k: lax_conv(x, k, (1, 2, 1, 1), "SAME", (1, 1, 1, 2)),
        "cp reconstructed": lambda x, p: lax_conv(x, cp_kernel(p), (2, 2, 2, 2), [(1, 1)] * 4),
        "tucker": lambda x, p: lax_conv(x, jnp.einsum("abcdxy,ix,oy->abcdio", p["core"], p["factor_in"],
                                                      p["factor_out"]), (1, 1, 1, 1), "SAME"),
    }

    def value_and_grads(f, w):
        g = jnp.asarray(np.random.default_rng(6).standard_normal(jax.eval_shape(f, x, w).shape, np.float32))
        return jitted_value_and_grads(f, g, x, w)

    want = {name: value_and_grads(oracles[name], w) for name, (_, w) in cases.items()}
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for name, (f, w) in cases.items():
        assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda x, w: jax.vjp(f, x, w)[1](f(x, w)))(x, w)), name
        got = value_and_grads(f, w)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want[name])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()), err_msg=name)
    x3, k3 = jnp.ones((2, 4, 5, 6, 3)), jnp.ones((3, 3, 3, 3, 4))
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda x, k: conv_ops.dense_conv(x, k))(x3, k3))


SPATIAL_SHARDING_SCRIPT = """
import json, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from hocp_jax import autotune, conv, conv_ops, conv_plans, init

mesh = jax.make_mesh((2,), ("a",))  # explicit axes, jax.make_mesh's default
x2, x3 = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), jax.random.normal(jax.random.key(1), (2, 4, 8, 8, 3))
cp2 = init.init_cp_params(jax.random.key(2), 3, 4, (3, 3), 5, skip=True)
cp3 = init.init_cp_params(jax.random.key(3), 3, 4, (3, 3, 3), 5, modes=("t", "h", "w"))
no_skip = {k: v for k, v in cp2.items() if k != "factor_skip"}
sep = conv.cp_to_separable(no_skip, ("h", "w"))
kernel = jax.random.normal(jax.random.key(4), (3, 3, 3, 4))
cases = {
    "cp 2-D factorized, skip, H split": (lambda x, p: conv.cp_conv(x, p, padding="SAME"), x2, cp2, P(None, "a")),
    "cp 2-D factorized, stride 2, W split": (lambda x, p: conv.cp_conv(x, p, stride=2, padding=1), x2, no_skip,
                                             P(None, None, "a")),
    "cp 2-D reconstructed, H split": (lambda x, p: conv.cp_conv(x, p, padding=1, implementation="reconstructed"),
                                      x2, no_skip, P(None, "a")),
    "cp 3-D auto, T split": (lambda x, p: conv.cp_conv(x, p, modes=("t", "h", "w"), padding=1, implementation="auto"),
                             x3, cp3, P(None, "a")),
    "separable, H split": (lambda x, p: conv.separable_conv(x, p, padding=1), x2, sep, P(None, "a")),
    "dense, stride 2, H split": (lambda x, k: conv_ops.dense_conv(x, k, stride=2, padding=1), x2, kernel, P(None, "a")),
}
errors = {}
for name, (f, x, p, spec) in cases.items():
    vg = jax.jit(jax.value_and_grad(lambda x, p: jnp.sum(jnp.sin(f(x, p))), argnums=(0, 1)))
    want = vg(x, p)
    with jax.set_mesh(mesh):
        got = vg(jax.device_put(x, NamedSharding(mesh, spec)), p)
    errors[name] = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                       for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
print(json.dumps(errors))
"""


def test_convs_run_with_an_explicitly_split_spatial_axis(run_on_devices):
    """Under explicit sharding (``jax.make_mesh``'s default) of a spatial axis, the CP paths (the
    factorized one's 1x1 contractions unflattened there, the reconstructed one's conv under
    ``auto_axes``, whose kernel gradient ``lax`` cannot shard), ``auto``, the separable and the
    dense conv give the values and gradients of the unsplit input, which the tests above check
    against dense convs. Two CPU devices, in a process of their own."""
    errors = run_on_devices(SPATIAL_SHARDING_SCRIPT, 2)
    assert len(errors) == 6 and all(err < 1e-4 for err in errors.values()), errors  # float32 sums split in two


@pytest.mark.parametrize("change,words", [
    (dict(factor_out=jnp.ones((6,))), r"params\['factor_out'\]: got shape \(6,\), expected a 2-D"),  # was: IndexError
    (dict(factor_out=None), "missing Tucker leaf 'factor_out'"),  # tucker_to_kernel: was KeyError
    (dict(core=jnp.ones((3, 3, 2, 2))), r"params\['core'\]: got shape \(3, 3, 2, 2\), expected \(\*K, R_in=2, R_out=3\)"),
    (dict(core=jnp.ones((0, 3, 2, 3))), r"params\['core'\]: got shape \(0, 3, 2, 3\)"),
    (dict(core=jnp.ones((3, 2, 3))), "has 1 kernel modes but x"),
])
def test_tucker_params_are_checked_by_name(change, words):
    x = jnp.ones((1, 6, 6, 4))
    p = dict(factor_in=jnp.ones((4, 2)), core=jnp.ones((3, 3, 2, 3)), factor_out=jnp.ones((6, 3)))
    p = {k: v for k, v in (p | change).items() if v is not None}
    calls = [lambda: conv.tucker_conv(x, p)] + ([] if "kernel modes" in words else [lambda: conv.tucker_to_kernel(p)])
    for call in calls:
        with pytest.raises(ValueError, match=words):
            call()


def test_zero_size_kernels_and_group_counts_are_named():
    """Before: 'reduce() of empty iterable' or MLIR verifier errors, and a bool group count accepted."""
    x = jnp.ones((1, 5, 5, 4))
    with pytest.raises(ValueError, match=r"kernel: got shape \(0, 3, 4, 6\)"):
        conv_ops.dense_conv(x, jnp.ones((0, 3, 4, 6)))
    with pytest.raises(ValueError, match="feature_group_count=True"):
        conv_ops.dense_conv(x, jnp.ones((3, 3, 4, 6)), feature_group_count=True)
    with pytest.raises(ValueError, match=r"kernel: got shape \(0, 3, 4\), expected a depthwise"):
        conv_ops.depthwise_conv(x, jnp.ones((0, 3, 4)))
    # no spatial mode (was: "expected 1-D x", "(B, 0 spatial sizes, ...)", "x has -1 spatial modes")
    with pytest.raises(ValueError, match=r"kernel: got shape \(3,\), expected \(\*K, C_in/groups, C_out\) with at least one"):
        conv_ops.dense_conv(x, jnp.ones((3,)))
    with pytest.raises(ValueError, match=r"kernel: got shape \(4,\), expected a depthwise .* at least one spatial mode"):
        conv_ops.depthwise_conv(x, jnp.ones((4,)))
    with pytest.raises(ValueError, match=r"x: got shape \(5, 4\), expected \(B, \*S, C_in\) with at least one"):
        conv.tt_conv(jnp.ones((5, 4)), {f"core_{i}": jnp.ones((1, 4, 1)) for i in range(3)})
    with pytest.raises(ValueError, match=r"params\['core_1'\]: got shape \(2, 0, 2\)"):
        conv.tt_conv(x, {"core_0": jnp.ones((1, 4, 2)), "core_1": jnp.ones((2, 0, 2)), "core_2": jnp.ones((2, 3, 2)),
                         "core_3": jnp.ones((2, 6, 1))})


def test_the_loops_and_the_conv_of_a_rebuilt_kernel_name_a_bad_argument():
    """``conv_ops.map_chunks``, ``map_tiles`` and ``weight_conv`` are public since stop 70: a wrong
    chunk, axis, tile or geometry is a ValueError naming it, not an XLA error."""
    x, k = jnp.ones((4, 6, 6, 3)), jnp.ones((3, 3, 3, 5))
    same = ((1, 1), (1, 1))
    for bad in (3, 0, 2.0):
        with pytest.raises(ValueError, match=rf"chunk={bad!r}: expected a positive number of samples"):
            conv_ops.map_chunks(lambda xc: xc, x, bad)
    for kwargs, match in (({"axis": 3}, "axis=3: expected a spatial axis"), ({"axis": 0}, "axis=0"),
                          ({"rows": 7}, r"rows=7: expected 1 to 6 output rows"), ({"rows": 0}, "rows=0"),
                          ({"halo": -1}, "halo=-1"), ({"pad": (-1, 1)}, r"pad=\(-1, 1\)")):
        args = {"axis": 1, "rows": 2, "halo": 2, "pad": (1, 1), **kwargs}
        with pytest.raises(ValueError, match=match):
            conv_ops.map_tiles(lambda xt: xt[:, 2:], x, **args)
    for args, match in (((x[..., :2], k, (1, 1), same, (1, 1)), r"x: got shape \(4, 6, 6, 2\)"),
                        ((x, k, (1,), same, (1, 1)), r"strides=\(1,\): expected one entry per spatial mode"),
                        ((x, k, (1, 1), ((1, 1), (1,)), (1, 1)), r"pads=.*expected one \(lo, hi\) pair")):
        with pytest.raises(ValueError, match=match):
            conv_ops.weight_conv(*args)
    # the valid calls still run: chunks of 2, tiles of 2 of the 6 rows (the halo of a 3-tap conv)
    assert conv_ops.map_chunks(lambda xc: 2 * xc, x, 2).shape == x.shape
    assert conv_ops.map_tiles(lambda xt: xt[:, 2:], x, 1, 2, 2, (1, 1)).shape == x.shape
