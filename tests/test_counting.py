"""Parameter/FLOP counts against the paper's figures and against the actual trees/XLA."""
import re

import jax
import jax.numpy as jnp
import pytest

from hocp_jax import conv, conv_ops, counting, init

JESTER = [(3, 64), (64, 128), (128, 256), (256, 256)]


def test_jester_paper_counts():
    k = (3, 3, 3)
    dense = sum(counting.dense_params(c, t, k) for c, t in JESTER)
    cp = sum(counting.cp_params(c, t, k, 6 * c) for c, t in JESTER)
    assert dense == 2_880_576
    assert cp == 1_183_338
    # and the count equals the real number of leaves in an initialised tree
    trees = [init.init_cp_params(jax.random.key(0), c, t, k, 6 * c) for c, t in JESTER]
    assert sum(x.size for tree in trees for x in jax.tree.leaves(tree)) == cp


def test_rank_for_budget():
    r = counting.cp_rank_for_budget(64, 64, (3, 3))
    assert counting.cp_params(64, 64, (3, 3), r) <= counting.dense_params(64, 64, (3, 3))
    assert counting.cp_params(64, 64, (3, 3), r + 1) > counting.dense_params(64, 64, (3, 3))
    with pytest.raises(ValueError, match="budget"):
        counting.cp_rank_for_budget(64, 64, (3, 3), budget=10)


def test_tucker_params_match_tree():
    p = init.init_tucker_params(jax.random.key(0), 8, 12, (3, 3), (4, 5))
    assert counting.tucker_params(8, 12, (3, 3), (4, 5)) == sum(x.size for x in jax.tree.leaves(p))


@pytest.mark.parametrize("stride", [1, 2])
def test_flops_match_xla_cost_analysis(stride):
    """Analytic FLOPs vs XLA's cost analysis of the compiled dense conv and factorized CP and Tucker convs."""
    x = jnp.ones((1, 8, 16, 16, 16))
    p = init.init_cp_params(jax.random.key(0), 16, 32, (3, 3, 3), 48)
    modes = ("d", "h", "w")
    kern = conv.cp_to_kernel(p, modes)

    def flops(f, *args):
        cost = jax.jit(f).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return cost["flops"]

    dense = flops(lambda x, k: conv_ops.dense_conv(x, k, stride=stride), x, kern)
    fact = flops(lambda x, p: conv.cp_conv(x, p, modes=modes, stride=stride), x, p)
    a_dense = counting.dense_flops((8, 16, 16), 16, 32, (3, 3, 3), stride=stride)
    a_cp = counting.cp_flops((8, 16, 16), 16, 32, (3, 3, 3), 48, stride=stride)
    assert 0.8 < dense / a_dense < 1.2
    assert 0.8 < fact / a_cp < 1.2
    assert a_cp < a_dense
    tp = init.init_tucker_params(jax.random.key(1), 16, 32, (3, 3, 3), (8, 12))
    tucker = flops(lambda x, p: conv.tucker_conv(x, p, stride=stride), x, tp)
    a_tucker = counting.tucker_flops((8, 16, 16), 16, 32, (3, 3, 3), (8, 12), stride=stride)
    assert 0.8 < tucker / a_tucker < 1.2


@pytest.mark.parametrize("call,words", [
    (lambda: counting.cp_params(4, 6, 3, 2), "kernel_size=3: expected a non-empty sequence"),  # was: int not iterable
    (lambda: counting.dense_params(-4, 6, (3, 3)), "in_channels=-4"),  # was: -216
    (lambda: counting.cp_params(4, 6, (3, 3), 2.5), "rank=2.5"),  # was: 42.5
    (lambda: counting.cp_params(4, 6, (3, 3), True), "rank=True"),
    (lambda: counting.tucker_params(4, 6, (3, 3), 2), "ranks=2"),
    (lambda: counting.cp_flops((5, 5), 4, 6, (3, 3), 2, order=(0, 0)), "order=(0, 0)"),  # was: accepted
    (lambda: counting.output_sizes((5, 5), 3), "kernel_size=3"),
    (lambda: counting.cp_path_costs(-1, (5, 5), 4, 6, (3, 3), 2), "batch=-1"),  # was: negative costs
    (lambda: counting.cp_rank_for_budget(4, 6, (3, 3), budget=float("nan")), "budget=nan"),  # was: NaN to integer
    (lambda: counting.output_sizes((2.5, 5), (3, 3)), "in_sizes=(2.5, 5)"),  # was: [3.0, 5]
    (lambda: init.target_variance(0, (3, 3)), "in_channels=0"),  # was: ZeroDivisionError (-2: a negative variance)
    (lambda: init.cp_factor_std(4, 3, -1.0), "variance=-1.0"),  # was: a complex power
    (lambda: init.cp_factor_std(4, -2, 1.0), "n_modes=-2"),  # was: ZeroDivisionError
], ids=["kernel-int", "channels", "rank-float", "rank-bool", "ranks-int", "order", "output-sizes", "batch", "budget",
        "in-sizes", "variance-channels", "factor-std-variance", "factor-std-modes"])
def test_bad_geometry_raises_naming_the_argument(call, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        call()


def test_figure6_xla_markers_match_the_analytic_counts():
    """benchmarks/figure6.py's XLA markers: before stop 79 its CP programs ran the CPU rules' tile loop, whose
    body XLA's cost_analysis counts once, and read 0.08-0.31 of the analytic count."""
    from benchmarks import figure6

    analytic, xla = figure6.analytic_gflops(16, 32), figure6.xla_gflops(16, 32)
    assert set(analytic) == set(xla) == {"3D-Conv", "CP-HOConv-3", "CP-HOConv-6"}
    for name in analytic:  # XLA does not count a padded conv's taps outside the input (0.92 here)
        assert 0.9 <= xla[name] / analytic[name] <= 1.2, (name, xla[name], analytic[name])
