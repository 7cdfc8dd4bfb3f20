"""Transduction AffectNet -> AFEW-VA (paper Table 3, temporal case): static HO-CP ResNet-18
trained on AffectNet images, transduced (temporal factor K_t = 3, the paper's "ones" init),
temporal factors trained alone, then everything fine-tuned on AFEW-VA clips; the 3-D and
(2+1)-D ResNet-18 baselines are trained from scratch on the same clips. Every model ends in a
CP tensor regression layer on the last feature map, per frame (paper Sec. 5); valence/arousal
only (AFEW-VA has no expression classes, so the AffectNet stage has no class head here). The
lasso is the paper's loss term with ``sparsity_tol = 0.01``, as in ``configs/affectnet.py``.

    python train.py --config configs/afew_va.py --workdir runs/afew_va \
        --config.data.manual_dir /data     # /data/affectnet/... and /data/afew_va/<clip>/...
    python train.py --config configs/afew_va.py:smoke --workdir /tmp/smoke
"""

from ml_collections import ConfigDict

from configs import common


def get_config(arg: str = ""):
    c = common.base("transduction")
    c.data.static, c.data.video = "affectnet", "afew_va"
    c.data.batch_size = 32
    head = dict(n_outputs=2, n_classes=0, bounded=True, trl="cp", trl_rank=64)
    c.model.kwargs = dict(head=head)
    c.loss.l1_gamma, c.loss.l1_prox, c.sparsity_tol = 0.01, False, 0.01
    c.static.num_steps = 30 * 9000
    c.transduction = ConfigDict(dict(modes={"t": 3}, init="ones", dense="keep"))
    c.stage1 = ConfigDict(dict(num_steps=5000, optimizer=dict(learning_rate=1e-3)))
    c.stage2 = ConfigDict(dict(num_steps=5000, optimizer=dict(learning_rate=1e-4)))
    c.baseline = ConfigDict(dict(models=("resnet18_3d", "resnet18_2plus1d"), num_steps=10000, kwargs=dict(head=head)))
    if arg == "smoke":
        head = dict(head, trl_rank=4)
        common.smoke(c, video=True, model_kwargs=dict(common.TINY_RESNET, head=head))
        c.baseline.kwargs = ConfigDict(dict(common.TINY_RESNET, head=head))
        c.baseline.models = ("resnet18_3d",)
    return c
