"""Transduction AffectNet -> AFEW-VA (paper Table 3, temporal case): static HO-CP ResNet-18
trained on AffectNet images, transduced (temporal factor K_t = 3, the paper's "ones" init),
temporal factors trained alone, then everything fine-tuned on AFEW-VA clips; the 3-D and
(2+1)-D ResNet-18 baselines are trained from scratch on the same clips. The HO-CP model ends in
a CP tensor regression layer on the last feature map, per frame (paper Sec. 5, for its
factorized network); the baselines in average pooling + a linear layer. Valence/arousal only:
``config.loss`` is shared by every stage and the AFEW-VA clips have no expression labels, so the
AffectNet stage has no class head or cross-entropy here (``configs/affectnet.py`` has both). No
Psi between the CP factors (the linear Eq. 6 form; README, "How the code reads the paper"). The
lasso is the paper's loss term with ``sparsity_tol = 0.01``, as in ``configs/affectnet.py``. The
paper gives no schedule for the video stages: they run at a constant learning rate (the static
stage keeps the paper's /10 every 15 epochs; counted in AFEW-VA's ~75 steps per epoch, which is
an estimate, it would have divided the video stages' rate 4 to 8 times).

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
    baseline_head = dict(n_outputs=2, n_classes=0, bounded=True)
    c.model.kwargs = dict(head=head)
    c.loss.l1_gamma, c.loss.l1_prox, c.sparsity_tol = 0.01, False, 0.01
    c.static.num_steps = 30 * 9000
    c.transduction = ConfigDict(dict(modes={"t": 3}, init="ones", dense="keep"))
    c.stage1 = ConfigDict(dict(num_steps=5000, optimizer=dict(learning_rate=1e-3, schedule="constant")))
    c.stage2 = ConfigDict(dict(num_steps=5000, optimizer=dict(learning_rate=1e-4, schedule="constant")))
    c.baseline = ConfigDict(dict(models=("resnet18_3d", "resnet18_2plus1d"), num_steps=10000,
                                 optimizer=dict(schedule="constant"), kwargs=dict(head=baseline_head)))
    if arg == "smoke":
        head = dict(head, trl_rank=4)
        common.smoke(c, video=True, model_kwargs=dict(common.TINY_RESNET, head=head))
        c.baseline.kwargs = ConfigDict(dict(common.TINY_RESNET, head=baseline_head))
        c.baseline.models = ("resnet18_3d",)
    return c
