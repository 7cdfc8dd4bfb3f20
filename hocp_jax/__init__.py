"""hocp-jax: factorized higher-order (CP/Tucker) convolutions in JAX.

The core is pure functions on pytrees: :mod:`hocp_jax.conv` (CP / Tucker / separable / TT convs),
:mod:`hocp_jax.conv_ops` (the dense, depthwise and 1x1 convs they are built from, and a faster drop-in
for ``lax.conv_general_dilated``), :mod:`hocp_jax.counting`, :mod:`hocp_jax.init`, :mod:`hocp_jax.regression`, and the
parameter-tree transforms :mod:`hocp_jax.tree` (finding layers by name),
:mod:`hocp_jax.transduction`, :mod:`hocp_jax.pruning`, :mod:`hocp_jax.decomposition` and
:mod:`hocp_jax.conversion`; :mod:`hocp_jax.optim` holds the name-based masks and the Lasso
on lambda. Flax Linen modules live in :mod:`hocp_jax.layers` and :mod:`hocp_jax.models`, Flax NNX modules in
:mod:`hocp_jax.nnx_layers`; factorized linear layers, TCL and tensor dropout in :mod:`hocp_jax.tensorized`; metrics,
losses, data pipelines and the training program in their own sub-packages (imported on
demand: ``hocp_jax.data`` needs TensorFlow Datasets).

The names below are the public API; every one is also reachable through its module.
"""

from hocp_jax import (conv, conv_ops, conversion, counting, decomposition, init, layers, losses, metrics, models,
                      nnx_layers, optim, pruning, regression, tensorized, transduction, tree)
from hocp_jax.conv import (cp_conv, cp_to_kernel, cp_to_separable, separable_conv, tt_conv, tt_to_kernel, tucker_conv,
                           tucker_to_kernel)
from hocp_jax.conv_ops import dense_conv, depthwise_conv
from hocp_jax.conversion import dense_to_hocp
from hocp_jax.decomposition import decompose, decompose_tree, tucker_decompose
from hocp_jax.init import init_cp_params, init_tucker_params
from hocp_jax.layers import TCL, TRL, CPConv, FactorizedLinear, SeparableConv, TTConv, TuckerConv
from hocp_jax.models import MODELS, get_model
from hocp_jax.optim import (l1_lambda, masked_optimizer, prox_l1_lambdas, soft_threshold_lambdas, sparsity_report,
                            transduction_stages)
from hocp_jax.pruning import prune_rank
from hocp_jax.regression import trl
from hocp_jax.tensorized import factorized_linear, tcl
from hocp_jax.transduction import transduce
from hocp_jax.tree import cp_layers

__version__ = "0.1.0"

__all__ = [
    # modules
    "conv", "conv_ops", "conversion", "counting", "decomposition", "init", "layers", "losses", "metrics", "models",
    "nnx_layers", "optim", "pruning", "regression", "tensorized", "transduction", "tree",
    # convolutions as functions
    "cp_conv", "cp_to_kernel", "cp_to_separable", "dense_conv", "depthwise_conv", "separable_conv", "tt_conv", "tt_to_kernel",
    "tucker_conv", "tucker_to_kernel", "init_cp_params", "init_tucker_params", "trl", "factorized_linear", "tcl",
    # Flax layers and models
    "CPConv", "TuckerConv", "SeparableConv", "TRL", "FactorizedLinear", "TCL", "TTConv", "MODELS", "get_model",
    # parameter-tree transforms
    "cp_layers", "transduce", "prune_rank", "decompose", "tucker_decompose", "decompose_tree", "dense_to_hocp",
    # optimisation
    "masked_optimizer", "transduction_stages", "l1_lambda", "soft_threshold_lambdas", "prox_l1_lambdas",
    "sparsity_report",
]
