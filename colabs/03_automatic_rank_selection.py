# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Automatic rank selection: Lasso on lambda, sparsity report, pruning
#
# Every CP conv carries a weight vector lambda (one entry per rank component). An L1 penalty
# `gamma * sum_l |lambda_l|`, minimised by proximal gradient steps (after each optimizer step lambda is
# soft-thresholded by `learning_rate * gamma`, so entries reach exact zeros), lets the network choose each
# layer's rank. Zeroed components are then **pruned**: every factor of the layer is sliced, giving a
# genuinely smaller model with the same outputs.
#
# The paper adds the penalty to the loss instead (`fit(..., reg_fn=functools.partial(optim.l1_lambda,
# gamma=...))`, what `configs/affectnet.py` does). Under Adam that form selected more rank at smaller gamma
# and less cost in the project's study (README, "Studies", `rank_selection`), but its lambdas only
# approach 0: prune them at a tolerance, `pruning.prune_rank(params, tol)`, and the outputs move slightly.

# %%
# On Colab: install the library from YOUR copy of the repository (the project has no public
# package or address). Set HOCP_JAX_SOURCE below, or as an environment variable, to a source pip
# can install: a local path such as "/content/hocp-jax" (upload or mount your checkout first), or
# the pip git URL of the repository you cloned or forked ("git+https://..."). Nothing is installed
# when hocp_jax is already importable (e.g. running from a checkout).
import importlib.util
import os
import subprocess
import sys

HOCP_JAX_SOURCE = os.environ.get("HOCP_JAX_SOURCE", "")  # e.g. "/content/hocp-jax"
if importlib.util.find_spec("hocp_jax") is None:
    if not HOCP_JAX_SOURCE:
        raise RuntimeError(
            "hocp_jax is not installed and HOCP_JAX_SOURCE is empty: set it in this cell to your copy of the "
            "repository (a local path such as '/content/hocp-jax', or a pip 'git+https://...' URL of your "
            "clone/fork) and run the cell again"
        )
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", HOCP_JAX_SOURCE], check=True)

# %%
import tempfile

import jax
import numpy as np
import optax

from hocp_jax import losses, optim, pruning
from hocp_jax.data import pipeline
from hocp_jax.models import count_params, get_model
from hocp_jax.training import fit
from hocp_jax.training.objectives import metric_fn
from hocp_jax.training.step import model_input  # uint8 batch -> float32 in [0, 1]

SMALL = os.environ.get("HOCP_COLAB_SMALL") == "1"
STEPS = 20 if SMALL else 800
GAMMA = 0.4  # Adam steps are ~LR, the threshold LR * GAMMA: GAMMA <= 0.3 zeroes nothing here, 0.4 ~8% of the rank
LR = 3e-3
workdir = tempfile.mkdtemp()
data_dir = os.path.join(workdir, "data")

# %%
model = get_model("resnet18_hocp", stage_sizes=(1, 1, 1, 1), widths=(16, 32, 32, 64), stem_kernel=3,
                  head=dict(n_outputs=2, bounded=True))


def loss_fn(outputs, batch, key):
    return losses.affect_loss(batch["va"], outputs["va"], key=key)


# Adam on the data loss, then the proximal step of the L1 penalty gamma * |lambda|_1: soft-thresholding
# every CP lambda by LR * GAMMA. The penalty is applied there only (not also as a loss term, reg_fn).
tx = optax.chain(optax.adam(LR), optim.prox_l1_lambdas(LR * GAMMA))
it = lambda: pipeline.train_iterator("digits_affect", "train", data_dir, batch_size=32, seed=0)
state = fit(model, loss_fn, tx, it, dict(num_steps=STEPS, seed=0, log_every=20, checkpoint_every=STEPS),
            os.path.join(workdir, "l1"))
variables = {"params": jax.device_get(state.params), "batch_stats": jax.device_get(state.batch_stats)}

# %% [markdown]
# ## Per-layer sparsity (supplementary Fig. 3)

# %%
report = optim.sparsity_report(variables["params"])
print(report.table())
fig = optim.plot_sparsity(report)
fig

# %% [markdown]
# ## Prune the zeroed components: a smaller model with the same predictions

# %%
pruned, pruned_stats, prune_report = pruning.prune_rank(variables["params"], 0.0, variables["batch_stats"])
small = {"params": pruned, "batch_stats": pruned_stats}
batch = next(pipeline.eval_batches("digits_affect", "test", data_dir, batch_size=300))
before = model.apply(variables, model_input(batch))
after = model.apply(small, model_input(batch))  # the same module: ranks are read from the tree
print(f"parameters: {count_params(variables['params']):,} -> {count_params(pruned):,}")
print("max |difference| of the predictions:", float(np.max(np.abs(np.asarray(before["va"]) - np.asarray(after["va"])))))
m_before, m_after = metric_fn(jax.device_get(before), batch), metric_fn(jax.device_get(after), batch)
print({k: round(m_before[k], 4) for k in ("valence_ccc", "arousal_ccc")}, "->",
      {k: round(m_after[k], 4) for k in ("valence_ccc", "arousal_ccc")})
