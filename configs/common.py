"""Pieces shared by the experiment configs (``configs/*.py`` import it; ``train.py`` runs from
the repository root, so ``configs`` is importable).

Every paper config takes an optional argument after a colon; ``:smoke`` swaps in the embedded
``digits_affect`` / ``moving_digits`` data, the tiny model and a few steps, so each config
can be checked on a fresh machine with no download, e.g.

    python train.py --config configs/affectnet.py:smoke --workdir /tmp/smoke
"""

from ml_collections import ConfigDict, config_dict

TINY_RESNET = dict(stage_sizes=(1, 1, 1, 1), widths=(8, 8, 16, 16), stem_kernel=3)


def base(job: str = "supervised") -> ConfigDict:
    """Keys every job reads (see hocp_jax/training/jobs.py)."""
    c = ConfigDict()
    c.job = job
    c.seed = 0
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.log_every = 50
    c.eval_every = 0  # > 0: evaluate on data.val_split every that many steps (and at the end)
    c.best_metric = ""  # e.g. "valence_ccc": keep <stage>/best, the best state by that metric
    c.profile_steps = 0  # > 0: the JAX profiler traces that many steps of each stage into <stage>/profile
    # k > 1: each batch runs through the model in k micro-batches, one after another (about 1/k of the activation
    # memory, two forward passes; the loss and gradient the whole batch's, batch norm per micro-batch); meant for GPU/TPU
    # memory (on this CPU 0.95-1.32x the step time: README, "Micro-batches")
    c.microbatches = 1
    c.sparsity_tol = 1e-6
    c.skew_repeats = 0
    # CP conv path picks: "" ($HOCP_JAX_AUTOTUNE, else measure on GPU, analytic elsewhere), "analytic" or "measure"
    c.autotune = ""
    # the factorized CP convs one sample (cp_per_sample=True) / one tile of cp_tile_rows rows at a time: the memory
    # option on GPU/TPU, where the automatic rules (None) leave these loops off (README, "Memory")
    c.cp_per_sample = config_dict.placeholder(bool)
    c.cp_tile_rows = config_dict.placeholder(int)
    # computation dtype of every model's layers: "float32" or "bfloat16" (mixed precision: parameters, optimizer
    # state, batch statistics, losses and metrics stay float32; README, "Mixed precision")
    c.dtype = "float32"
    # a checkpoint (step, checkpoints/ or best/ directory, or a stage directory) whose params and batch statistics
    # start the static stage instead of a random init; with static.num_steps=0 they are the static model as they are
    c.init_from = ""
    c.data = ConfigDict(dict(static="digits_affect", video="moving_digits", data_dir="", manual_dir="",
                             batch_size=32, eval_batch_size=64, eval_split="test", val_split="validation",
                             read_threads=1, prefetch=2, workers=0))
    c.model = ConfigDict(dict(name="resnet18_hocp", kwargs=dict(head=dict(n_outputs=2, n_classes=0, bounded=True))))
    c.loss = ConfigDict(dict(kind="affect", va_weight=1.0, shake_shake=True, weights=(1.0, 1.0, 1.0),
                             ce_weight=0.0, class_weights=(), l1_gamma=0.0, l1_prox=True))
    c.optimizer = ConfigDict(dict(name="adam", learning_rate=1e-3, schedule="step", decay_every_epochs=15,
                                  decay_factor=0.1, weight_decay=0.0))
    c.static = ConfigDict(dict(num_steps=1000))
    return c


def smoke(c: ConfigDict, *, video: bool = False, model_kwargs: dict | None = None) -> ConfigDict:
    """The same job on the embedded data with a tiny model and a handful of steps."""
    c.data.static = "digits_affect"
    c.data.video = "moving_digits"
    c.data.manual_dir = ""
    c.data.batch_size = 16
    c.data.eval_batch_size = 64
    c.log_every = 5
    c.checkpoint_every = 10
    c.static.num_steps = 10
    if model_kwargs is not None:
        c.model.kwargs = ConfigDict(model_kwargs)
    if video:
        c.stage1.num_steps = c.stage2.num_steps = 5
        c.baseline.num_steps = 5
    return c
