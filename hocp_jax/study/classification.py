"""Study 3, HO-CP vs HO-CP-S vs dense 3-D convs on a video classification proxy: accuracy vs parameters.

The Jester network (:class:`hocp_jax.models.JesterNet`, supplementary Sec. 7: conv 3x3x3 -> BN ->
ELU -> 2x2x2 max-pool blocks, FC, class head) with three blocks for the 8 x 32 x 32 clips, trained
from scratch on the ``moving_digits`` class label (the digit, 10 classes) as a stand-in for
Jester's 27 gestures: ``dense`` 3x3x3 convs at two widths, ``hocp`` (CP over t, h, w, ReLU psi)
and ``hocp_s`` (plus the skip factor U^(S), PReLU psi) at several ranks (``rank_multiple`` x C_in).
Metric: clip accuracy on the test clips. Caveat of the proxy: the digit is visible in every single
frame, so this measures how well each conv learns a video classifier, not temporal reasoning.
"""

from __future__ import annotations

import numpy as np

from hocp_jax.models import get_model
from hocp_jax.study import runner as R

SETTINGS = {
    "tiny": dict(variants=(("dense", (2, 4, 4), 0), ("hocp", (4, 8, 8), 1), ("hocp_s", (4, 8, 8), 1)),
                 fc=8, n_clips=16, seeds=(0,), steps=2, batch_size=4, n_test=20),
    "quick": dict(variants=(("dense", (4, 8, 8), 0), ("dense", (8, 16, 16), 0), ("hocp", (8, 16, 16), 2),
                            ("hocp_s", (8, 16, 16), 2)),
                  fc=32, n_clips=512, seeds=(0,), steps=250, batch_size=16, n_test=150),
    "full": dict(variants=(("dense", (4, 8, 8), 0), ("dense", (8, 16, 16), 0), ("hocp", (8, 16, 16), 1),
                           ("hocp", (8, 16, 16), 2), ("hocp", (8, 16, 16), 6), ("hocp_s", (8, 16, 16), 1),
                           ("hocp_s", (8, 16, 16), 2), ("hocp_s", (8, 16, 16), 6)),
                 fc=32, n_clips=2048, seeds=(0, 1, 2), steps=900, batch_size=16, n_test=150),
}
LR = 3e-3


def _name(conv: str, widths, rank_multiple) -> str:
    return f"{conv} widths {tuple(widths)}" + (f" rank {rank_multiple}xC_in" if conv != "dense" else "")


def run(s: dict, out: str) -> tuple[dict, str]:
    train = R.dataset("moving_digits", "train", s["n_clips"])
    test = R.subset(R.dataset("moving_digits", "test"), s["n_test"])
    loss = R.loss_config(ce_weight=1.0, va_weight=0.0)
    runs = []
    for conv, widths, rm in s["variants"]:
        model = get_model({"dense": "jester"}.get(conv, f"jester_{conv}"), widths=tuple(widths), fc_features=s["fc"],
                          head=dict(n_outputs=0, n_classes=10), **({"rank_multiple": float(rm)} if rm else {}))
        tr = R.trainer(model, f"adam {LR}", lambda: R.adam(LR), loss)
        for seed in s["seeds"]:
            v = R.init_variables(model, train["video"][:2], seed)
            v = tr.train(v, train, steps=s["steps"], batch_size=s["batch_size"], seed=seed)
            m = R.evaluator(model)(v, test)
            runs.append(dict(model=_name(conv, widths, rm), conv=conv, params=R.n_params(v), seed=seed,
                             accuracy=m["class_accuracy"], f1=m["class_f1"]))
            print(f"[classification] {runs[-1]['model']} seed {seed}: {runs[-1]['params']} params, "
                  f"accuracy {runs[-1]['accuracy']:.3f}", flush=True)
    names = list(dict.fromkeys(r["model"] for r in runs))
    summary = {n: dict(conv=next(r["conv"] for r in runs if r["model"] == n),
                       params=next(r["params"] for r in runs if r["model"] == n),
                       accuracy=R.mean_spread([r["accuracy"] for r in runs if r["model"] == n])) for n in names}
    _plot(summary, f"{out}/accuracy_vs_params.png")
    rows = [[n, m["params"], f"{m['accuracy'][0]:.3f} ± {m['accuracy'][1]:.3f}"] for n, m in summary.items()]
    report = "\n".join([__doc__.split("\n\n", 1)[1].strip(), "", f"Settings: {s}; Adam lr {LR}, cross-entropy only.", "",
                        R.table(["model", "parameters", f"test accuracy (mean ± half-range, {len(s['seeds'])} seeds)"], rows),
                        "", "![accuracy vs parameters](accuracy_vs_params.png)"])
    return dict(runs=runs, summary=summary), report


def _plot(summary: dict, path: str) -> None:
    def draw(axes):
        for conv, marker in (("dense", "s"), ("hocp", "o"), ("hocp_s", "^")):
            pts = [(m["params"], *m["accuracy"]) for m in summary.values() if m["conv"] == conv]
            if pts:
                x, y, e = np.array(sorted(pts)).T
                axes[0].errorbar(x, y, yerr=e, marker=marker, capsize=3, label=conv)
        axes[0].set_xscale("log")
        axes[0].set_xlabel("parameters")
        axes[0].set_ylabel("test clip accuracy")
        axes[0].grid(alpha=0.3)
        axes[0].legend()
    R.figure(path, draw)
