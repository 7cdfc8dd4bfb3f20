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
# # From images to video by higher-order transduction
#
# 1. Train a static HO-CP ResNet on images (`digits_affect`, built offline from scikit-learn's digits).
# 2. **Transduce** its parameter tree: every CP conv gets a temporal factor `factor_t` (K_t x R).
# 3. Stage 1: train only the temporal factors (everything else frozen with `optax.partition`).
# 4. Stage 2: fine-tune everything.
# 5. Plot per-frame valence/arousal predictions on `moving_digits` videos, where arousal is the digit's speed
#    (it needs time), valence its identity (readable from one frame).

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
import matplotlib.pyplot as plt
import numpy as np
import optax

from hocp_jax import losses, optim, transduction
from hocp_jax.data import pipeline
from hocp_jax.models import count_params, get_model
from hocp_jax.training import fit
from hocp_jax.training.objectives import metric_fn
from hocp_jax.training.step import model_input  # uint8 batch -> float32 in [0, 1]

SMALL = os.environ.get("HOCP_COLAB_SMALL") == "1"  # the test suite runs this notebook with tiny settings
STEPS = dict(static=20, stage1=10, stage2=10) if SMALL else dict(static=600, stage1=200, stage2=200)
BATCH = 8 if SMALL else 32
workdir = tempfile.mkdtemp()
data_dir = os.path.join(workdir, "data")

# %% [markdown]
# ## 1. A static HO-CP ResNet on images

# %%
model = get_model("resnet18_hocp", stage_sizes=(1, 1, 1, 1), widths=(16, 32, 32, 64), stem_kernel=3,
                  head=dict(n_outputs=2, bounded=True))


def loss_fn(outputs, batch, key):
    va, pred = batch["va"].reshape(-1, 2), outputs["va"].reshape(-1, 2)
    return losses.affect_loss(va, pred, key=key)  # shake-shake RMSE/PCC/CCC loss


def train(stage, dataset, tx, steps, init_variables=None):
    it = lambda: pipeline.train_iterator(dataset, "train", data_dir, batch_size=BATCH, seed=0)
    cfg = dict(num_steps=steps, seed=0, stage=stage, log_every=10, checkpoint_every=max(steps, 1))
    state = fit(model, loss_fn, tx, it, cfg, os.path.join(workdir, stage), init_variables=init_variables)
    return {"params": jax.device_get(state.params), "batch_stats": jax.device_get(state.batch_stats)}


static = train("static", "digits_affect", optax.adam(3e-3), STEPS["static"])
print("static model parameters:", count_params(static["params"]))

# %% [markdown]
# ## 2. Transduction: a parameter-tree transform

# %%
video_params = transduction.transduce(static["params"], {"t": 3}, init="delta", dense="keep")
conv = video_params["layer1_0"]["conv1"]
print({k: v.shape for k, v in conv.items() if k.startswith("factor")})
n_temporal = sum(v.size for p, v in jax.tree_util.tree_leaves_with_path(video_params) if "factor_t" in str(p))
print("new temporal parameters:", n_temporal)

# %% [markdown]
# ## 3. Stage 1: temporal factors only; 4. Stage 2: everything

# %%
tx1 = optim.masked_optimizer(optax.adam(1e-2), video_params, trainable="temporal")
stage1 = train("stage1", "moving_digits", tx1, STEPS["stage1"], static | {"params": video_params})
frozen_same = all(np.array_equal(a, b) for (pa, a), (pb, b) in zip(
    jax.tree_util.tree_leaves_with_path(video_params), jax.tree_util.tree_leaves_with_path(stage1["params"]))
    if "factor_t" not in str(pa))
print("spatial factors unchanged after stage 1:", frozen_same)
stage2 = train("stage2", "moving_digits", optax.adam(1e-3), STEPS["stage2"], stage1)

# %% [markdown]
# ## 5. Per-frame predictions on test videos

# %%
batch = next(pipeline.eval_batches("moving_digits", "test", data_dir, batch_size=64))
predict = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
results = {}
for name, variables in {"static (per frame)": static | {"params": video_params}, "stage 1": stage1, "stage 2": stage2}.items():
    out = predict(variables, model_input(batch))
    results[name] = out
    m = metric_fn(jax.device_get(out), batch)
    print(f"{name:20s} valence CCC {m['valence_ccc']:.3f}   arousal CCC {m['arousal_ccc']:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for j, (ax, target) in enumerate(zip(axes, ("valence", "arousal"))):
    ax.plot(batch["va"][0, :, j], "k-", lw=2.5, label="ground truth")
    for name, out in results.items():
        ax.plot(np.asarray(out["va"])[0, :, j], marker=".", label=name)
    ax.set_title(target)
    ax.set_xlabel("frame")
axes[0].legend(fontsize=7)
plt.show()
