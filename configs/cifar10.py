"""CIFAR-10 (supplementary Sec. 6, Table 3): MobileNet-v2 (``:dense``) vs the HO-CP variant
(``:hocp``, two separable 1-D depthwise convs per block); SGD, batch 128, lr 0.1 divided by 10
after epochs 150 and 250 of 400, momentum 0.9, weight decay 4e-5 (dense) / 1e-4 (HO-CP).
The paper averages 3 runs: run seeds 0, 1 and 2 (``--config.seed``) in separate workdirs.
CIFAR-10 comes from the TFDS catalog: prepare it once with
``tfds build cifar10 --file_format=array_record --data_dir <data_dir>``.

    python train.py --config configs/cifar10.py:hocp --workdir runs/cifar --config.data.data_dir ~/tensorflow_datasets
    python train.py --config configs/cifar10.py:hocp,smoke --workdir /tmp/smoke
"""

from configs import common


def get_config(arg: str = "hocp"):
    args = [a for a in arg.split(",") if a]
    variant = next((a for a in args if a != "smoke"), "hocp")
    if variant not in ("dense", "hocp"):
        raise ValueError(f"configs/cifar10.py: variant {variant!r}; expected 'dense' or 'hocp'")
    c = common.base("supervised")
    c.data.static = "cifar10"
    c.data.batch_size = 128
    c.model.name = "mobilenet_v2" if variant == "dense" else "mobilenet_v2_hocp"
    c.model.kwargs = dict(head=dict(n_outputs=0, n_classes=10))
    c.loss.va_weight, c.loss.ce_weight = 0.0, 1.0
    c.optimizer = dict(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=4e-5 if variant == "dense" else 1e-4,
                       schedule="piecewise", boundaries_epochs=(150, 250), decay_factor=0.1)
    c.static.num_steps = 400 * 390
    if "smoke" in args:
        tiny = dict(cfg=[[1, 8, 1, 1], [2, 8, 2, 1], [2, 16, 1, 2]], stem_features=8, last_features=32)
        common.smoke(c, model_kwargs=dict(tiny, head=dict(n_outputs=0, n_classes=10)))
    return c
