"""``tests/conftest.py`` runs the suite with XLA's CPU backend at optimisation level 0: that must
change only the machine code (whose rounding can differ), not the optimised HLO the tests check. Compiled in two processes,
at level 0 and at XLA's default, the HLO text of a CP conv's (3-D, per sample, in tiles) and a
dense conv's fwd+bwd programs must be the same."""

SCRIPT = r"""
import hashlib, json, re
import jax, jax.numpy as jnp
from hocp_jax import autotune, conv, conv_ops, conv_plans, init

x = jnp.ones((2, 5, 8, 8, 4))
p = init.init_cp_params(jax.random.key(0), 4, 6, (3, 3, 3), 10)
k = jnp.ones((3, 3, 3, 4, 6))
with conv_plans.tile_rows_mode(2):
    programs = {
        "cp": jax.jit(jax.grad(lambda x, p: jnp.sum(conv.cp_conv(x, p, per_sample=True) ** 2), argnums=(0, 1))).lower(x, p),
        "dense": jax.jit(jax.grad(lambda x, k: jnp.sum(conv_ops.dense_conv(x, k) ** 2), argnums=(0, 1))).lower(x, k),
    }
    texts = {name: lowered.compile().as_text() for name, lowered in programs.items()}
# metadata (source lines, op names) aside
print(json.dumps({name: hashlib.sha256(re.sub(r"metadata=\{[^}]*\}", "", t).encode()).hexdigest() for name, t in texts.items()}))
"""


def test_optimisation_level_0_compiles_the_same_hlo(run_on_devices):
    assert (run_on_devices(SCRIPT, 1, xla_flags="--xla_backend_optimization_level=0")
            == run_on_devices(SCRIPT, 1, xla_flags=""))
