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
# # Factorized higher-order convolutions with hocp-jax
#
# A CP (Kruskal) convolution replaces a dense kernel $W \in \mathbb{R}^{K_0 \times \dots \times K_{N-1} \times C \times T}$
# by $W = [\![\lambda; U^{(T)}, U^{(C)}, U^{(K_0)}, \dots, U^{(K_{N-1})}]\!]$ and is computed as a 1x1 contraction
# with $U^{(C)}$, one depthwise 1-D convolution per mode and a 1x1 contraction with $\mathrm{diag}(\lambda) U^{(T)}$
# (Kossaifi et al., CVPR 2020, Eq. 6-7). This notebook checks the equivalences numerically and reproduces the
# parameter/FLOP counts and the paper's Figure 6.

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
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt

from hocp_jax import conv, conv_ops, counting, init

key = jax.random.key(0)

# %% [markdown]
# ## 1. A 3-D CP convolution equals the dense convolution of its reconstructed kernel

# %%
x = jax.random.normal(key, (2, 8, 16, 16, 4))  # (batch, time, height, width, channels)
params = init.init_cp_params(key, 4, 8, (3, 3, 3), rank=12, modes=("t", "h", "w"))
print({k: v.shape for k, v in params.items()})
y_fact = conv.cp_conv(x, params, modes=("t", "h", "w"), stride=(1, 2, 2), padding="SAME")
y_dense = conv_ops.dense_conv(x, conv.cp_to_kernel(params, ("t", "h", "w")), stride=(1, 2, 2), padding="SAME")
print("output", y_fact.shape, "max |factorized - dense| =", float(jnp.max(jnp.abs(y_fact - y_dense))))

# %% [markdown]
# ## 2. Padding: lax `SAME` vs PyTorch-style symmetric padding at stride 2 on an even size

# %%
from hocp_jax.padding import resolve_padding

print("SAME      ", resolve_padding("SAME", (16,), (3,), (2,), (1,)))
print("SYMMETRIC ", resolve_padding("SYMMETRIC", (16,), (3,), (2,), (1,)))

# %% [markdown]
# ## 3. Tucker convolution and MobileNet-v2 as special cases

# %%
x2 = jax.random.normal(key, (2, 16, 16, 8))
cp2 = init.init_cp_params(key, 8, 16, (3, 3), rank=48)
sep = conv.cp_to_separable(cp2, ("h", "w"))  # merged depthwise factor = MobileNet-v2 block (no BN/ReLU)
print("depthwise kernel", sep["depthwise"].shape)
print("CP == separable:", float(jnp.max(jnp.abs(conv.cp_conv(x2, cp2, modes=("h", "w")) - conv.separable_conv(x2, sep)))))
tk = init.init_tucker_params(key, 8, 16, (3, 3), (4, 6))
print("Tucker factorized == reconstructed:", float(jnp.max(jnp.abs(
    conv.tucker_conv(x2, tk) - conv.tucker_conv(x2, tk, implementation="reconstructed")))))

# %% [markdown]
# ## 4. Parameter counts: the Jester network's convolutions (rank 6 x C_in)

# %%
jester = [(3, 64), (64, 128), (128, 256), (256, 256)]
dense = sum(counting.dense_params(c, t, (3, 3, 3)) for c, t in jester)
cp = sum(counting.cp_params(c, t, (3, 3, 3), 6 * c) for c, t in jester)
print(f"dense 3-D convs: {dense:,}   HO-CP convs: {cp:,}   (paper: 2.9M vs 1.2M)")

# %% [markdown]
# ## 5. Figure 6: GFLOPs of a 3-D conv vs CP-HOConv (rank 3x and 6x C_in), input 32x32x16, kernel 3x3x3

# %%
channels = [(16, 16), (32, 32), (64, 64), (128, 128), (256, 256)]
size = (16, 32, 32)
g = lambda f: f / 1e9
dense_g = [g(counting.dense_flops(size, c, t, (3, 3, 3))) for c, t in channels]
cp3 = [g(counting.cp_flops(size, c, t, (3, 3, 3), 3 * c)) for c, t in channels]
cp6 = [g(counting.cp_flops(size, c, t, (3, 3, 3), 6 * c)) for c, t in channels]
labels = [f"{c}x{t}" for c, t in channels]
plt.figure(figsize=(6, 3.5))
for ys, name in ((dense_g, "3D-Conv"), (cp6, "CP-HOConv-6"), (cp3, "CP-HOConv-3")):
    plt.plot(labels, ys, marker="o", label=name)
plt.ylabel("GFLOPs (2 x MACs)")
plt.xlabel("input x output channels")
plt.yscale("log")
plt.legend()
plt.tight_layout()
plt.show()
