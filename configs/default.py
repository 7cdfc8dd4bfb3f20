"""The main job on the embedded data (no download): static HO-CP ResNet on ``digits_affect``
images -> transduction -> temporal factors only -> fine-tune all, on ``moving_digits``
videos, compared with a from-scratch 3-D ResNet. Finishes in a few minutes on 2 CPU cores.

    python train.py --config configs/default.py --workdir /tmp/hocp
    python train.py --config configs/default.py --workdir /tmp/hocp --config.static.num_steps=50
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.job = "transduction"
    c.seed = 0
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.log_every = 20
    c.eval_every = 0  # > 0: evaluate on data.val_split every that many steps (and at the end)
    c.best_metric = ""  # e.g. "arousal_ccc": keep <stage>/best, the best state by that metric
    c.profile_steps = 0  # > 0: the JAX profiler traces that many steps of each stage into <stage>/profile
    # k > 1: each batch runs through the model in k micro-batches, one after another (about 1/k of the activation
    # memory, two forward passes; the loss and gradient the whole batch's, batch norm per micro-batch); meant for GPU/TPU
    # memory (on this CPU 0.95-1.32x the step time: README, "Micro-batches")
    c.microbatches = 1
    c.sparsity_tol = 1e-6
    # CP conv path picks: "" ($HOCP_JAX_AUTOTUNE, else measure on GPU, analytic elsewhere), "analytic" or "measure"
    c.autotune = ""
    # the factorized CP convs one sample (cp_per_sample=True) / one tile of cp_tile_rows rows at a time: the memory
    # option on GPU/TPU, where the automatic rules (None) leave these loops off (README, "Memory")
    c.cp_per_sample = config_dict.placeholder(bool)
    c.cp_tile_rows = config_dict.placeholder(int)
    # computation dtype of the models' layers: "float32" or "bfloat16" (parameters, optimizer state, batch statistics,
    # losses and metrics stay float32; README, "Mixed precision")
    c.dtype = "float32"
    # a checkpoint whose params and batch statistics start the static stage (README, "Starting from another run");
    # with static.num_steps=0 they are the static model as they are
    c.init_from = ""

    c.data = ConfigDict(dict(
        static="digits_affect", video="moving_digits", data_dir="", manual_dir="",
        batch_size=32, eval_batch_size=64, eval_split="test", val_split="validation",
        read_threads=1, prefetch=2, workers=0,  # grain: record-reading threads, batches ahead, processes
    ))
    # A narrow ResNet-18-style HO-CP network (one block per stage) for 32x32 inputs.
    c.model = ConfigDict(dict(name="resnet18_hocp", kwargs=dict(
        stage_sizes=(1, 1, 1, 1), widths=(16, 32, 32, 64), stem_kernel=3,
        head=dict(n_outputs=2, n_classes=10, bounded=True),
    )))
    c.loss = ConfigDict(dict(
        va_weight=1.0, shake_shake=True, weights=(1.0, 1.0, 1.0),
        ce_weight=0.1, class_weights=(),
        l1_gamma=1e-3, l1_prox=True,
    ))
    c.optimizer = ConfigDict(dict(name="adam", learning_rate=3e-3, schedule="step", decay_every_epochs=15,
                                  decay_factor=0.1, weight_decay=0.0))
    c.static = ConfigDict(dict(num_steps=1500))
    # "mean" (1/K per tap) keeps activation scales, so the static batch-norm statistics still
    # fit; the paper's "ones" multiplies them by up to K per layer. Measured from the same static
    # model, 150 stage-1 steps: test arousal CCC 0.68 with "mean", 0.18 with "ones" (README, run with
    # --config.transduction.init=ones; configs/afew_va.py keeps the paper's "ones").
    c.transduction = ConfigDict(dict(modes={"t": 3}, init="mean", dense="keep"))
    c.stage1 = ConfigDict(dict(num_steps=150, optimizer=dict(learning_rate=1e-2)))
    c.stage2 = ConfigDict(dict(num_steps=150, optimizer=dict(learning_rate=1e-3)))
    c.baseline = ConfigDict(dict(models=("resnet18_3d",), num_steps=300, kwargs=dict(
        stage_sizes=(1, 1, 1, 1), widths=(16, 32, 32, 64), stem_kernel=3,
        head=dict(n_outputs=2, n_classes=10, bounded=True),
    )))
    return c
