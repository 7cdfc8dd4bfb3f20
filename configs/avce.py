"""AVCE (contrastive affect learning with SparseMax/SoftMax feature views): backbone
``alexnet`` / ``resnet18`` / ``resnet18_hocp``; the AVCE bound (``objective="avce"``) or
InfoNCE (``"infonce"``) + valence/arousal regression, on AffectNet's 224x224 face crops (the
builder config ``affectnet/s224``: the supplementary times its networks on 224x224 images, on
which AlexNet's conv stack ends at 6x6, the size of its adaptive pool; on the 64x64 crops of
``affectnet``'s default config, ``--config.data.static=affectnet``, it would end at 1x1). The
supplementary gives no learning rate, batch size, steps or loss weights: ours (the loss weights
follow the authors' public code as :mod:`hocp_jax.contrastive` was first written from it; not
re-checked offline).

    python train.py --config configs/avce.py:resnet18_hocp --workdir runs/avce --config.data.manual_dir /data/affectnet
    python train.py --config configs/avce.py:alexnet,smoke --workdir /tmp/smoke
"""

from ml_collections import ConfigDict

from configs import common

BACKBONES = {"alexnet": "avce_alexnet", "resnet18": "avce_resnet18", "resnet18_hocp": "avce_resnet18_hocp"}


def get_config(arg: str = "resnet18"):
    args = [a for a in arg.split(",") if a]
    backbone = next((a for a in args if a != "smoke"), "resnet18")
    if backbone not in BACKBONES:
        raise ValueError(f"configs/avce.py: backbone {backbone!r}; expected one of {sorted(BACKBONES)}")
    c = common.base("supervised")
    c.data.static = "affectnet/s224"
    c.data.batch_size = 256
    c.model.name = BACKBONES[backbone]
    c.model.kwargs = dict(bounded=True)
    c.loss.kind = "avce"
    c.loss.avce = ConfigDict(dict(objective="avce", contrastive_weight=0.025, alpha=0.5, beta=0.005, gamma=0.5))
    c.optimizer.learning_rate = 1e-4
    c.static.num_steps = 50_000
    if "smoke" in args:
        tiny = dict(widths=(8, 16, 16, 16, 16)) if backbone == "alexnet" else dict(backbone=common.TINY_RESNET)
        common.smoke(c, model_kwargs=dict(tiny, head_hidden=32, bounded=True))
    return c
