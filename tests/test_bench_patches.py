"""The benchmark's patches-matmul dense conv (a second JAX dense program) against lax's convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from benchmarks.patches import dense_patches, patches_convs


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


def test_patches_convs_replaces_the_models_dense_convs_and_restores_lax():
    import flax.linen as nn

    from hocp_jax.models.common import DenseConv

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 9, 8, 3)), jnp.float32)
    conv = DenseConv(5, (3, 3), (2, 2))
    params = conv.init(jax.random.PRNGKey(0), x)
    want = conv.apply(params, x)
    original = lax.conv_general_dilated
    with patches_convs() as replaced:
        got = jax.jit(conv.apply)(params, x)
        dilated = nn.Conv(5, (3, 3), kernel_dilation=2, use_bias=False).init_with_output(jax.random.PRNGKey(0), x)[0]
    assert lax.conv_general_dilated is original
    assert replaced == [(x.shape, (3, 3, 3, 5))]  # the dilated conv ran as before
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert dilated.shape == (2, 9, 8, 5)


def test_patches_convs_can_be_limited_to_a_networks_first_convs():
    from hocp_jax.models.common import DenseConv

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    first, second = DenseConv(8, (3, 3), (1, 1)), DenseConv(4, (3, 3), (1, 1))
    p1, p2 = first.init(jax.random.PRNGKey(0), x), second.init(jax.random.PRNGKey(1), jnp.zeros((2, 6, 6, 8)))
    want = second.apply(p2, first.apply(p1, x))
    with patches_convs(max_in_channels=4) as replaced:
        got = jax.jit(lambda a: second.apply(p2, first.apply(p1, a)))(x)
    assert replaced == [(x.shape, (3, 3, 3, 8))]  # the 8-channel conv ran as before
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_targets_compare_the_faster_dense_program_of_each_side():
    """``bench.targets`` against hand-computed ratios: the faster of each model's two programs (the
    HO-CP model without dense convs has one), and for the layers the per-layer faster dense program."""
    from benchmarks import bench

    def row(name, ms, reference=None):
        return {"name": name, "ms": ms, "reference": reference}

    models = [row("d", 100.0), row("d (patches)", 80.0), row("h", 90.0, "d"), row("h (patches)", 95.0, "d (patches)"),
              row("jd", 50.0), row("jd (patches)", 30.0), row("jh", 24.0, "jd")]
    layers = [{"dense": 10.0, "dense patches": 6.0, "factorized": 4.0, "reconstructed": 9.0, "auto": 4.0},
              {"dense": 2.0, "dense patches": 3.0, "factorized": 2.5, "reconstructed": 1.5, "auto": 1.5}]
    rows = [{"ms": ms, "analytic_flops_fwd": dict.fromkeys(("dense", "factorized", "reconstructed"), 1.0),
             "xla_flops_fwd": dict.fromkeys(("dense", "factorized", "reconstructed"), 1.0),
             "params": {"dense": 1, "cp": 1}} for ms in layers]
    t = bench.targets({"totals": {"jester": bench.stack_total(rows)}, "models": models, "conv": {}})
    assert t["h"] == pytest.approx(0.9) and t["h vs faster dense"] == pytest.approx(90 / 80)
    assert t["jh"] == pytest.approx(24 / 50) and t["jh vs faster dense"] == pytest.approx(24 / 30)
    assert t["jester_auto/dense"] == pytest.approx(5.5 / 12) and t["jester_auto/faster dense"] == pytest.approx(5.5 / 8)


def test_the_stack_is_compared_with_tensorly_torchs_faster_path_of_each_layer():
    """As ``auto`` picks per layer, TensorLy-Torch's best CP path of the stack is the sum of each
    layer's faster path (here 5 + 2 = 7 ms), not the faster of its two stack totals (8 ms)."""
    from benchmarks import bench

    peers = [{"torch dense": 4.0, "tltorch cp reconstructed": 5.0, "tltorch cp factorized": 9.0},
             {"torch dense": 1.0, "tltorch cp reconstructed": 4.0, "tltorch cp factorized": 2.0}]
    rows = [{"ms": {"dense": 10.0, "dense patches": 6.0, "factorized": 4.0, "reconstructed": 9.0, "auto": 4.0} | p,
             "analytic_flops_fwd": dict.fromkeys(("dense", "factorized", "reconstructed"), 1.0),
             "xla_flops_fwd": dict.fromkeys(("dense", "factorized", "reconstructed"), 1.0),
             "params": {"dense": 1, "cp": 1}} for p in peers]
    total = bench.stack_total(rows)
    assert total["per_layer_tltorch_best_ms"] == 7.0
    assert total["ratios"]["auto/tltorch best"] == pytest.approx(8 / 7)
    assert total["ratios"]["auto/torch dense"] == pytest.approx(8 / 5)


def test_targets_score_both_autotune_policies_with_the_benchmarks_own_times():
    """The analytic pick and the measured autotune's pick, each against the faster CP path as the
    benchmark timed it (hand-computed: layer a picks recon at 1.2x, layer b's measured pick 1.5x)."""
    from benchmarks import bench

    def layer(name, fact, recon, choice, measured):
        best = min(fact, recon)
        ms = {"factorized": fact, "reconstructed": recon}
        return {"group": "g", "name": name, "ms": ms, "auto_choice": choice,
                "measured_best": min(ms, key=ms.get), "ratios": {"auto/best": ms[choice] / best},
                "measured_autotune": {"pick": measured, "ratio to best": ms[measured] / best},
                "xla/analytic": {"factorized": 1.0}}

    rows = [layer("a", 10.0, 12.0, "reconstructed", "factorized"), layer("b", 4.0, 6.0, "factorized", "reconstructed")]
    t = bench.targets({"totals": {}, "models": [], "conv": {"g": rows}})
    assert t["worst_auto/best"] == pytest.approx(1.2) and t["worst_auto/best_layer"] == "g a"
    assert t["worst_measured_autotune/best"] == pytest.approx(1.5) and t["worst_measured_autotune/best_layer"] == "g b"
    assert (t["auto_correct"], t["measured_autotune_correct"], t["n_layers"]) == (1, 1, 2)
    lines = "\n".join(bench.target_lines(t))
    assert "worst auto/best = 1.20 (g a)" in lines and "worst = 1.50 (g b); the measured-faster path on 1/2" in lines


def test_the_benchmark_rejects_a_dense_program_or_step_that_computes_something_else():
    from benchmarks import bench

    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 6, 6, 2)), jnp.float32)
    k = jnp.asarray(np.random.default_rng(3).normal(size=(3, 3, 2, 3)), jnp.float32)
    pads = ((1, 1), (1, 1))

    def ref(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    bench.check_same_conv("ok", ref, lambda x, k: dense_patches(x, k, (1, 1), pads), x, k)
    with pytest.raises(AssertionError, match="flipped"):  # a flipped kernel is another conv
        bench.check_same_conv("flipped", ref, lambda x, k: dense_patches(x, k[::-1, ::-1], (1, 1), pads), x, k)
    bench.check_same_step("ok", {"loss": 2.0, "grad_norm": 3.002}, {"loss": 2.0, "grad_norm": 3.0}, "a", "b's")
    with pytest.raises(AssertionError, match="bad: a's loss 2.001 differs from b's 2.0"):
        bench.check_same_step("bad", {"loss": 2.001, "grad_norm": 3.0}, {"loss": 2.0, "grad_norm": 3.0}, "a", "b's")


def test_the_stack_ratios_round_by_round_add_up_each_layers_reading_of_that_round():
    """Round i of the stack = the sum of each layer's i-th reading of the path it uses (auto's
    pick, the faster dense program and TensorLy-Torch path by the medians), over the rounds every
    layer has; hand-computed on two layers with 3 and 2 rounds."""
    from benchmarks import bench

    def layer(times, choice):
        ms = {p: float(np.median(t)) for p, t in times.items()}
        return {"ms": ms, "times_ms": times, "auto_choice": choice}

    a = layer({"dense": [10, 20, 30], "dense patches": [8, 8, 8], "factorized": [2, 4, 6], "reconstructed": [9, 9, 9],
               "torch dense": [4, 4, 4], "tltorch cp reconstructed": [5, 5, 5], "tltorch cp factorized": [7, 7, 7]},
              "factorized")
    b = layer({"dense": [5, 5], "dense patches": [6, 6], "factorized": [3, 3], "reconstructed": [1, 3],
               "torch dense": [2, 2], "tltorch cp reconstructed": [4, 4], "tltorch cp factorized": [1, 3]},
              "reconstructed")
    q = bench.stack_rounds([a, b])
    # round 0: auto 2 + 1 = 3, dense 15, faster dense 8 + 5 = 13, torch 6, tltorch best 5 + 1 = 6
    # round 1: auto 4 + 3 = 7, dense 25, faster dense 13, torch 6, tltorch best 5 + 3 = 8
    assert q["auto/dense"] == pytest.approx({"median": (3 / 15 + 7 / 25) / 2, "min": 3 / 15, "max": 7 / 25, "rounds": 2})
    assert q["auto/faster dense"]["min"] == pytest.approx(3 / 13) and q["auto/faster dense"]["max"] == pytest.approx(7 / 13)
    assert q["auto/torch dense"]["max"] == pytest.approx(7 / 6)
    assert q["auto/tltorch best"]["min"] == pytest.approx(3 / 6) and q["auto/tltorch best"]["max"] == pytest.approx(7 / 8)
    lines = bench.target_lines({"jester_auto/dense": 0.24, "jester_auto/dense per round": q["auto/dense"]})
    assert "- Jester stack, HO-CP auto / JAX dense (goal <= 0.5): 0.24 (met; per round 0.20-0.28, median 0.24, 2 rounds)." in lines
