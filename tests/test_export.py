"""``jax.export`` with a symbolic batch, and symbolic spatial sizes (shape polymorphism): the CPU
rules' loops, patches, chunks and kernel-gradient products step aside (``conv_plans.is_static``),
``auto`` picks as for one sample, and the exported programs give, at any batch and size, what an
independent ``lax`` computation (the layers) or the model traced at that shape (the models) gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export, lax

from hocp_jax import autotune, conv_ops, conv_plans, transduction
from hocp_jax.conv import best_mode_order, cp_conv, cp_to_kernel, tt_conv, tt_to_kernel, tucker_conv, tucker_to_kernel
from hocp_jax.init import init_cp_params, init_tucker_params
from hocp_jax.layers import TRL
from hocp_jax.models import MODELS, get_model
from hocp_jax.padding import resolve_padding
from hocp_jax.pooling import max_pool

B, = export.symbolic_shape("b")


def symbolic_batch(x):
    return jax.ShapeDtypeStruct((B, *x.shape[1:]), x.dtype)


def value_and_grads(f):
    """``x, w -> (f(x, w), d/dw, d/dx)`` of the loss ``sum(sin(f(x, w)))`` (a cotangent that varies)."""
    def run(x, w):
        y, pull = jax.vjp(f, x, w)
        gx, gw = pull(jnp.cos(y))
        return y, gw, gx
    return run


def assert_exported_matches(f, oracle, x, w, batches=(1, 3), spec=None, xs=()):
    """``f`` exported with a symbolic batch (or for ``spec``), called at each batch of ``x`` (and
    on each of ``xs``), against ``oracle`` (same signature) traced at that shape, outputs and
    gradients."""
    exported = export.export(jax.jit(value_and_grads(f)))(symbolic_batch(x) if spec is None else spec, w)
    for xb in [x[:b] for b in batches] + list(xs):
        got, want = exported.call(xb, w), value_and_grads(oracle)(xb, w)
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-4 * float(jnp.abs(e).max()))


def test_is_static():
    assert conv_plans.is_static((2, 3)) and conv_plans.is_static((np.int64(2),)) and conv_plans.is_static(())
    assert not conv_plans.is_static((B, 3))


CP_CASES = {  # x's shape, rank, whether the loops are forced on (else the automatic rules')
    "3-D RGB": ((3, 4, 7, 6, 3), 6, True),  # on CPU a video stem runs as patches
    "3-D": ((3, 4, 7, 6, 8), 6, True),
    "2-D": ((3, 32, 32, 8), 512, False),  # 6 MiB of intermediate: chunks of samples at a static batch
}


@pytest.mark.parametrize("implementation", ["factorized", "reconstructed", "auto"])
@pytest.mark.parametrize("case", sorted(CP_CASES))
def test_cp_conv_exports_with_a_symbolic_batch(implementation, case):
    shape, rank, forced = CP_CASES[case]
    n = len(shape) - 2
    x = jax.random.normal(jax.random.key(0), shape)
    p = init_cp_params(jax.random.key(1), shape[-1], 5, (3,) * n, rank)
    pads = ((1, 1), (0, 2), (1, 1))[-n:]
    f = lambda x, p: cp_conv(x, p, implementation=implementation, padding=pads)
    dims = conv_ops.channels_last_dims(n)
    oracle = lambda x, p: lax.conv_general_dilated(x, cp_to_kernel(p, tuple("dhw"[-n:])), (1,) * n, pads, dimension_numbers=dims)
    if forced:  # every loop and product the rules can be told to take: at a symbolic batch, none runs
        with conv_plans.per_sample_mode(True), conv_plans.tile_rows_mode(2), conv_plans.patches_split_mode(True):
            assert_exported_matches(f, oracle, x, p)
    else:
        assert conv_plans.batch_chunk_default(shape, shape[:-1] + (5,), rank, jnp.float32) == 1
        assert_exported_matches(f, oracle, x, p)


def test_dense_2d_conv_exports_with_a_symbolic_batch():
    x = jax.random.normal(jax.random.key(0), (3, 20, 18, 8))
    k = jax.random.normal(jax.random.key(1), (3, 3, 8, 6))
    dims = ("NHWC", "HWIO", "NHWC")
    with conv_plans.dense_chunks_mode(True):
        assert conv_ops.conv_route(x, k, dimension_numbers=dims) == "chunks"  # at a static batch
        f = lambda x, k: conv_ops.conv_general_dilated(x, k, (2, 1), ((1, 1), (1, 1)), dimension_numbers=dims)
        oracle = lambda x, k: lax.conv_general_dilated(x, k, (2, 1), ((1, 1), (1, 1)), dimension_numbers=dims)
        assert_exported_matches(f, oracle, x, k)


def test_max_pool_exports_with_a_symbolic_batch():
    x = jax.random.normal(jax.random.key(0), (3, 9, 8, 4))
    pads = ((1, 1), (0, 1))
    f = lambda x, s: max_pool(x * s, (3, 3), (2, 2), pads)
    oracle = lambda x, s: lax.reduce_window(x * s, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                            ((0, 0), *pads, (0, 0)))
    assert_exported_matches(f, oracle, x, jnp.float32(1.5))


def test_padding_of_a_symbolic_size():
    """Pads that do not depend on the size resolve; ``'SAME'`` on a strided symbolic mode raises,
    or with ``symbolic_same`` gives pads that are lax's at each size."""
    h, = export.symbolic_shape("h", scope=B.scope)
    assert resolve_padding("SAME", (h, 5), (3, 3), (1, 2), (1, 1)) == ((1, 1), (1, 1))
    assert resolve_padding("SYMMETRIC", (h,), (3,), (2,), (1,)) == ((1, 1),)
    assert resolve_padding(((0, 2),), (h,), (5,), (2,), (1,)) == ((0, 2),)
    with pytest.raises(ValueError, match=r"^padding='SAME' with stride 2 on a symbolic size h \(jax.export\)"):
        resolve_padding("SAME", (h,), (3,), (2,), (1,))

    def pads_as_shapes(x):
        (lo, hi), = resolve_padding("SAME", x.shape, (3,), (2,), (1,), symbolic_same=True)
        return jnp.zeros(lo), jnp.zeros(hi)

    exported = export.export(jax.jit(pads_as_shapes))(jax.ShapeDtypeStruct((h,), jnp.float32))
    for size, pads in ((8, (0, 1)), (9, (1, 1)), (1, (1, 1))):
        lo, hi = exported.call(jnp.zeros(size))
        assert (lo.size, hi.size) == pads == resolve_padding("SAME", (size,), (3,), (2,), (1,))[0]


def symbolic_sizes(shape, dtype=jnp.float32, n=None):
    """An input of examples of ``shape`` (``(*S, C)``) with a symbolic batch and symbolic last ``n``
    spatial sizes (all by default; named ``t, h, w`` from the last)."""
    n = len(shape) - 1 if n is None else n
    dims = export.symbolic_shape(", ".join(["b", *["t", "h", "w"][3 - n:]]))
    return jax.ShapeDtypeStruct((dims[0], *shape[:len(shape) - 1 - n], *dims[1:], shape[-1]), dtype)


def symbolic_hw(x):
    """``x``'s shape with a symbolic batch, height and width (the last two spatial modes)."""
    return symbolic_sizes(x.shape[1:], x.dtype, 2)


@pytest.mark.parametrize("padding", ["SYMMETRIC", "SAME"])
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed", "auto"])
@pytest.mark.parametrize("n", [2, 3])
def test_cp_conv_exports_with_symbolic_sizes(implementation, n, padding):
    """Symbolic batch, height and width; a stride of 2, called at odd and even sizes: pads that do
    not depend on the size ('SYMMETRIC'), and lax's 'SAME' ones, which do. In 3-D the two frames are
    fewer than the kernel's three: on CPU the reconstructed kernel runs as per-tap products, taps of
    every symbolic mode kept."""
    lead = (2,) * (n - 2)
    x = jax.random.normal(jax.random.key(0), (3, *lead, 9, 8, 4))
    others = [jax.random.normal(jax.random.key(2), (2, *lead, 6, 11, 4))]
    p = init_cp_params(jax.random.key(1), 4, 5, (3,) * n, 6)
    strides = (1,) * (n - 2) + (2, 1)
    f = lambda x, p: cp_conv(x, p, implementation=implementation, stride=strides, padding=padding)
    dims = conv_ops.channels_last_dims(n)
    oracle = lambda x, p: lax.conv_general_dilated(x, cp_to_kernel(p, tuple("dhw"[-n:])), strides,
                                                   "SAME" if padding == "SAME" else ((1, 1),) * n, dimension_numbers=dims)
    if n == 3:
        assert conv_plans.small_map_taps((3, 2, 9, 8, 4), (3, 3, 3)), "the taps route at a static shape"
    assert_exported_matches(f, oracle, x, p, spec=symbolic_hw(x), xs=others)


def test_convs_export_with_same_padding_on_symbolic_sizes():
    """'SAME' at stride 2 on symbolic sizes: the dense, depthwise, Tucker and TT convs against lax's
    'SAME' conv of their kernels, at odd and even sizes."""
    x = jax.random.normal(jax.random.key(0), (3, 9, 8, 4))
    others = [jax.random.normal(jax.random.key(2), (2, 6, 11, 4))]
    dims = ("NHWC", "HWIO", "NHWC")

    def lax_same(x, kernel, groups=1):
        return lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=dims, feature_group_count=groups)

    k = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
    tucker = init_tucker_params(jax.random.key(3), 4, 5, (3, 3), (3, 2))
    tt = {f"core_{i}": jax.random.normal(jax.random.key(4 + i), shape)
          for i, shape in enumerate([(1, 4, 3), (3, 3, 2), (2, 3, 3), (3, 5, 1)])}
    cases = [
        (lambda x, k: conv_ops.dense_conv(x, k, stride=2), lax_same, k),
        (lambda x, k: conv_ops.depthwise_conv(x, k, stride=2), lambda x, k: lax_same(x, k[:, :, None], 4), k[..., 0]),
        (lambda x, p: tucker_conv(x, p, stride=2), lambda x, p: lax_same(x, tucker_to_kernel(p)), tucker),
        (lambda x, p: tt_conv(x, p, stride=2), lambda x, p: lax_same(x, tt_to_kernel(p)), tt),
    ]
    for f, oracle, w in cases:
        assert_exported_matches(f, oracle, x, w, spec=symbolic_hw(x), xs=others)


@pytest.mark.parametrize("case", ["psi", "skip", "psi and skip", "skip, reconstructed"])
def test_cp_conv_with_psi_or_skip_exports_same_padding_on_symbolic_sizes(case):
    """'SAME' at stride 2 on symbolic sizes with Psi between the factors (one that maps 0 to non-0,
    so its passes must pad their own inputs, not the conv's input) or a skip factor (which reads
    the input unpadded): against the factorized conv written with lax's depthwise 'SAME' convs at
    odd and even sizes."""
    x = jax.random.normal(jax.random.key(0), (3, 9, 8, 4))
    others = [jax.random.normal(jax.random.key(2), (2, 6, 11, 4)), jax.random.normal(jax.random.key(3), (1, 10, 1, 4))]
    p = init_cp_params(jax.random.key(1), 4, 5, (3, 3), 6)
    if "skip" in case:
        p = {**p, "factor_skip": jax.random.normal(jax.random.key(4), (4, 5))}
    psi = (lambda h, stage: jnp.tanh(h + 0.3)) if "psi" in case else None
    implementation = "reconstructed" if "reconstructed" in case else "factorized"
    f = lambda x, p: cp_conv(x, p, stride=(2, 2), padding="SAME", psi=psi, mode_order=("h", "w"),
                             implementation=implementation)

    def oracle(x, p):
        h = jnp.einsum("bhwc,cr->bhwr", x, p["factor_in"])
        h = psi(h, "in") if psi else h
        for axis, mode in ((1, "h"), (2, "w")):
            kernel = jnp.expand_dims(p[f"factor_{mode}"], (2 - axis, 2))  # (3, 1, 1, R) or (1, 3, 1, R)
            strides = (2, 1) if axis == 1 else (1, 2)
            h = lax.conv_general_dilated(h, kernel, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=h.shape[-1])
            h = psi(h, mode) if psi else h
        y = jnp.einsum("bhwr,or,r->bhwo", h, p["factor_out"], p["lambda"])
        return y + x[:, ::2, ::2] @ p["factor_skip"] if "factor_skip" in p else y

    assert_exported_matches(f, oracle, x, p, spec=symbolic_hw(x), xs=others)


def test_mode_order_of_symbolic_sizes_is_by_stride():
    h, w = export.symbolic_shape("h, w")
    assert best_mode_order((h, w), (3, 3), (1, 2), ((1, 1), (1, 1)), (1, 1)) == (1, 0)
    assert best_mode_order((4, h, w), (3, 3, 3), (1, 2, 2), ((1, 1),) * 3, (1, 1, 1)) == (1, 2, 0)


def test_max_pool_exports_with_symbolic_sizes():
    """The pool's windows slice a padded input of symbolic size: JAX proves the slices in bounds
    from the sizes' lower bounds (``constraints``), as a user declares them."""
    b, h, w = export.symbolic_shape("b, h, w", constraints=("h >= 3", "w >= 3"))
    x = jax.random.normal(jax.random.key(0), (3, 9, 8, 4))
    pads = ((1, 1), (0, 1))
    f = lambda x, s: max_pool(x * s, (3, 3), (2, 2), pads)
    oracle = lambda x, s: lax.reduce_window(x * s, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                            ((0, 0), *pads, (0, 0)))
    spec = jax.ShapeDtypeStruct((b, h, w, 4), x.dtype)
    assert_exported_matches(f, oracle, x, jnp.float32(1.5), spec=spec,
                            xs=[jax.random.normal(jax.random.key(1), (2, 6, 11, 4))])


def test_auto_counts_a_symbolic_dimension_as_one():
    p = init_cp_params(jax.random.key(1), 64, 64, (3, 3), 273)
    geometry = (("h", "w"), (1, 1), ((1, 1), (1, 1)), (1, 1))
    with autotune.policy_mode("measure"):  # nothing to time on a symbolic shape: the analytic pick
        got = autotune.choose_cp((B, 56, 56, 64), jnp.float32, p, *geometry)
    assert got == autotune.analytic_pick((1, 56, 56, 64), p, *geometry, True)


MODEL_INPUTS = {
    "resnet18": (32, 32, 3), "resnet18_3d": (2, 32, 32, 3), "resnet18_2plus1d": (2, 32, 32, 3),
    "resnet18_hocp": (32, 32, 3), "jester": (16, 16, 16, 3), "jester_hocp": (16, 16, 16, 3),
    "jester_hocp_s": (16, 16, 16, 3), "mobilenet_v2": (16, 16, 3), "mobilenet_v2_hocp": (16, 16, 3),
    "bregnet39": (16, 16, 1), "bregnet39_hocp": (16, 16, 1), "resnet110": (16, 16, 1),
    "avce_alexnet": (32, 32, 3), "avce_resnet18": (32, 32, 3), "avce_resnet18_hocp": (32, 32, 3),
}


def test_every_model_has_an_export_input():
    assert set(MODEL_INPUTS) == set(MODELS)


# The models whose spatial sizes cannot be symbolic, and why (the ValueError's words).
FIXED_SIZES = {
    "jester": "the head flattens", "jester_hocp": "the head flattens", "jester_hocp_s": "the head flattens",
    "avce_alexnet": "whether a pool applies",
}
# Another shape for the models with symbolic sizes, and the transduced HO-CP ResNet-18 (video).
OTHER_SIZES = {"resnet18_3d": (3, 24, 40, 3), "resnet18_2plus1d": (3, 24, 40, 3), "resnet18_hocp": (24, 40, 3),
               "mobilenet_v2": (20, 12, 3), "mobilenet_v2_hocp": (20, 12, 3), "bregnet39": (12, 20, 1),
               "resnet110": (12, 20, 1), "bregnet39_hocp": (12, 20, 1), "resnet18": (24, 40, 3), "avce_resnet18": (24, 40, 3),
               "avce_resnet18_hocp": (24, 40, 3), "resnet18_hocp transduced": (3, 24, 40, 3)}


def get_tiny(name):
    name = name.removesuffix(" transduced")
    return get_model(name, tiny=True, **({} if name.startswith("avce") else dict(head=dict(n_outputs=2, n_classes=3))))


@pytest.mark.parametrize("name", sorted(FIXED_SIZES))
def test_models_of_fixed_sizes_say_so_at_symbolic_sizes(name):
    model, shape = get_tiny(name), MODEL_INPUTS[name]
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), jnp.zeros((1, *shape)))
    with pytest.raises(ValueError, match=FIXED_SIZES[name]):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v,
                       symbolic_sizes(shape))


def test_a_trl_says_it_needs_static_sizes():
    """A TRL head (``head.trl``, the AffectNet and AFEW-VA configs') regresses the whole last map."""
    x = symbolic_sizes((4, 4, 8))
    with pytest.raises(ValueError, match=r"symbolic sizes \(jax.export\) in the regressed modes"):
        jax.eval_shape(lambda x: TRL(features=2, rank=4).init(jax.random.key(0), x), x)


def test_every_model_is_tested_at_symbolic_sizes_or_says_why_not():
    assert set(FIXED_SIZES) | set(OTHER_SIZES) == set(MODELS) | {"resnet18_hocp transduced"}


@pytest.mark.slow  # 10-60 s a model; the default run tests the layers above
@pytest.mark.parametrize("sizes", [False, True], ids=["batch", "sizes"])
@pytest.mark.parametrize("name", sorted(set(MODEL_INPUTS) | set(OTHER_SIZES)))
def test_model_exports_with_a_symbolic_batch(name, sizes):
    """Inference and a train-mode gradient, exported once, against the model traced at each batch,
    in float64 (``auto`` may pick other CP paths at a symbolic batch, and train-mode batch norms
    over a few values amplify float32 rounding). ``sizes``: the spatial (and temporal) sizes are
    symbolic too, and the programs are also called on another shape."""
    if (name in FIXED_SIZES) if sizes else name not in MODEL_INPUTS:
        pytest.skip("tested above" if sizes else "the transduced model: with symbolic sizes only")
    model = get_tiny(name)
    transduced = name.endswith(" transduced")
    shape = OTHER_SIZES[name][:1] + MODEL_INPUTS["resnet18_hocp"] if transduced else MODEL_INPUTS[name]
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (3, *shape), jnp.float64)
        x_init = x[:, 0] if transduced else x
        v = jax.tree.map(lambda a: a.astype(jnp.float64),
                         jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x_init))
        if transduced:
            v = {**v, "params": transduction.transduce(v["params"], {"t": 3}, "ones", dense="keep")}
        others = [jax.random.normal(jax.random.key(3), (2, *OTHER_SIZES[name]), jnp.float64)] if sizes else []
        spec = symbolic_sizes(shape, x.dtype) if sizes else symbolic_batch(x)

        def infer(x, v):
            return model.apply(v, x, train=False)

        def grads(x, p):
            def loss(p):
                out, _ = model.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.key(2)})
                return jnp.sum(jnp.sin(out["va"]))
            return jax.grad(loss)(p)

        for f, w in ((infer, v), (grads, v["params"])):
            exported = export.export(jax.jit(f))(spec, w)
            for xb in [x[:1], x] + others:
                got, want = jax.tree.leaves(exported.call(xb, w)), jax.tree.leaves(jax.jit(f)(xb, w))
                scale = max(float(jnp.abs(e).max()) for e in want)  # per tree: some gradient leaves are ~0
                for g, e in zip(got, want):
                    np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-10 * scale)


def test_target_mode_gives_another_backends_routes_and_analytic_picks():
    """A depthwise conv: the shift kernel on CPU, no XLA convolution; ``lax``'s grouped conv for a
    GPU, in a program exported for CUDA on this CPU host, whose values (run here) are ``lax``'s."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 6))
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, 6))
    dims = ("NHWC", "HWIO", "NHWC")
    f = lambda x, k: conv_ops.conv_general_dilated(x, k, (2, 1), "SAME", dimension_numbers=dims, feature_group_count=6)
    oracle = lambda x, k: lax.conv_general_dilated(x, k, (2, 1), "SAME", dimension_numbers=dims, feature_group_count=6)
    assert conv_plans.backend() == jax.default_backend() == "cpu"
    assert "convolution" not in export.export(jax.jit(f))(x, k).mlir_module()
    with conv_plans.target_mode("cuda"):  # (a new function: jax.jit keeps f's trace of before the block)
        assert conv_plans.backend() == "gpu"
        assert "convolution" in export.export(jax.jit(lambda x, k: f(x, k)), platforms=("cuda",))(x, k).mlir_module()
        np.testing.assert_allclose(jax.jit(lambda x, k: f(x, k))(x, k), oracle(x, k), rtol=1e-5, atol=1e-5)
        with autotune.policy_mode("measure"):
            assert autotune.policy() == "analytic"  # nothing here times a GPU
    with pytest.raises(ValueError, match=r"^platform='npu'"):
        conv_plans.target_mode("npu")
