"""Transduction AffectNet -> AFEW-VA (paper Table 3, temporal case): static HO-CP ResNet-18
trained on AffectNet images, transduced (temporal factor K_t = 3, the paper's "ones" init),
temporal factors trained alone, then everything fine-tuned on AFEW-VA clips; the 3-D and
(2+1)-D ResNet-18 baselines are trained from scratch on the same clips. The HO-CP model ends in
a CP tensor regression layer on the last feature map, per frame (paper Sec. 5, for its
factorized network); the baselines in average pooling + a linear layer. On AffectNet the model
also classifies the 8 expressions (cross-entropy, as the paper does "on AffectNet, where discrete
classes of emotions are available"); the AFEW-VA clips have no expression labels, so the video
stages turn the cross-entropy off (``stage1.loss`` and ``stage2.loss``) and their class head is
left as it is. The static model is thus ``configs/affectnet.py``'s, and a finished AffectNet run can
be the static stage: ``--config.init_from=runs/affectnet/static --config.static.num_steps=0``
(README, "Starting from another run"). No
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
    head = dict(n_outputs=2, n_classes=8, bounded=True, trl="cp", trl_rank=64)  # configs/affectnet.py's
    baseline_head = dict(n_outputs=2, n_classes=0, bounded=True)
    c.model.kwargs = dict(head=head)
    c.loss.ce_weight = 1.0
    c.loss.l1_gamma, c.loss.l1_prox, c.sparsity_tol = 0.01, False, 0.01
    c.static.num_steps = 30 * 9000
    c.transduction = ConfigDict(dict(modes={"t": 3}, init="ones", dense="keep"))
    no_labels = dict(ce_weight=0.0)  # AFEW-VA's clips: valence and arousal only
    c.stage1 = ConfigDict(dict(num_steps=5000, optimizer=dict(learning_rate=1e-3, schedule="constant"), loss=no_labels))
    c.stage2 = ConfigDict(dict(num_steps=5000, optimizer=dict(learning_rate=1e-4, schedule="constant"), loss=no_labels))
    c.baseline = ConfigDict(dict(models=("resnet18_3d", "resnet18_2plus1d"), num_steps=10000,
                                 optimizer=dict(schedule="constant"), kwargs=dict(head=baseline_head)))
    if arg == "smoke":
        head = dict(head, trl_rank=4, n_classes=10)  # the embedded digits' 10 classes
        common.smoke(c, video=True, model_kwargs=dict(common.TINY_RESNET, head=head))
        c.baseline.kwargs = ConfigDict(dict(common.TINY_RESNET, head=baseline_head))
        c.baseline.models = ("resnet18_3d",)
    return c
