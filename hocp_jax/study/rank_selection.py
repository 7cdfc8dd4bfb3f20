"""Study 2, automatic rank selection: sweep the lasso strength gamma on the CP lambdas.

For every gamma a static HO-CP ResNet is trained on ``digits_affect`` with Adam and the lasso
``gamma * sum |lambda|`` in one of two forms. ``proximal``: Adam followed by
:func:`hocp_jax.optim.prox_l1_lambdas` (threshold ``lr * gamma`` per step, exact zeros; no penalty
term in the loss). ``loss``: the paper's form (Sec. 4), the penalty added to the loss
(:func:`hocp_jax.optim.l1_lambda`) and Adam on the sum; Adam normalises each update, so a lambda
the data no longer needs is driven to 0 at about ``lr`` per step and then hovers within a few
``lr`` of it, never exactly 0. Then :func:`hocp_jax.pruning.prune_rank` drops the components with
``|lambda| <= tol`` (factors, lambda and Psi/BN slices): ``tol = 0`` for the proximal form (only
exact zeros: scores before and after pruning agree up to float summation order), the setting's
``tol`` for the loss form (pruning drops small nonzero lambdas, so scores may move). Reported per
form and gamma: parameters before/after pruning, the zeroed fraction
(:func:`hocp_jax.optim.sparsity_report`), test CCC and class accuracy before and after pruning,
the measured median time of one jitted train step (batch of 32 images) of the pruned model, and
the mean ``|lambda|`` and mean column norm of ``factor_out`` over the CP layers before pruning (the layer's function is unchanged if a lambda shrinks while its output column
grows; these show whether training did that).
The two forms' gammas are not comparable: Adam rescales the loss term's gradient, not the
proximal threshold.
"""

from __future__ import annotations


import numpy as np

from hocp_jax import optim, pruning, tree
from hocp_jax.study import runner as R

SETTINGS = {
    "tiny": dict(widths=(4, 4, 8, 8), gammas=(0.0, 100.0), loss_gammas=(0.01,), tol=1e-2, seeds=(0,),
                 static_steps=4, n_test=20, repeats=2),
    "quick": dict(widths=(8, 8, 16, 16), gammas=(0.0, 0.3, 1.0, 3.0), loss_gammas=(0.003, 0.01, 0.03), tol=1e-2,
                  seeds=(0,), static_steps=300, n_test=300, repeats=10),
    "full": dict(widths=(8, 8, 16, 16), gammas=(0.0, 0.1, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 3.0, 10.0),
                 loss_gammas=(0.001, 0.003, 0.01, 0.03, 0.1), tol=1e-2, seeds=(0, 1), static_steps=800, n_test=300,
                 repeats=20),
}
METRICS = ("valence_ccc", "arousal_ccc", "class_accuracy")
LR, BATCH = 3e-3, 32
FORMS = ("proximal", "loss")


def run(s: dict, out: str) -> tuple[dict, str]:
    test = R.subset(R.dataset("digits_affect", "test"), s["n_test"])
    batch = R.subset(R.dataset("digits_affect", "train"), BATCH)
    runs = []
    for form in FORMS:
        tol = 0.0 if form == "proximal" else s["tol"]
        for gamma in s["gammas"] if form == "proximal" else s["loss_gammas"]:
            for seed in s["seeds"]:
                model, v = R.static_model(s["widths"], steps=s["static_steps"], seed=seed, gamma=gamma, lr=LR,
                                          lasso=form)
                sparsity = optim.sparsity_report(v["params"], tol)
                layers = [layer for _, layer in tree.cp_layers(v["params"])]
                params, stats, rep = pruning.prune_rank(v["params"], tol, v.get("batch_stats"))
                pruned = {"params": params, "batch_stats": stats}
                before, after = R.evaluator(model)(v, test), R.evaluator(model)(pruned, test)
                tr = R.trainer(model, f"adam {LR} lasso 0.0", lambda: R.adam(LR))
                runs.append(dict(form=form, gamma=gamma, seed=seed, tol=tol, params_before=rep.params_before,
                                 params_after=rep.params_after,
                                 rank_before=sum(layer.rank_before for layer in rep.layers),
                                 rank_after=sum(layer.rank_after for layer in rep.layers),
                                 zeroed_lambdas=sparsity.zeroed, params_freed=sparsity.params_freed,
                                 lambda_abs_mean=float(np.mean([np.abs(lay["lambda"]).mean() for lay in layers])),
                                 factor_out_norm_mean=float(np.mean([np.linalg.norm(lay["factor_out"], axis=0).mean()
                                                                     for lay in layers])),
                                 step_time_s=tr.step_time(pruned, batch, s["repeats"]))
                            | {f"{k}_before": before[k] for k in METRICS} | {f"{k}_after": after[k] for k in METRICS})
                r = runs[-1]
                print(f"[rank_selection] {form} gamma {gamma} seed {seed}: params {r['params_before']} -> "
                      f"{r['params_after']}, arousal {r['arousal_ccc_before']:.3f} -> {r['arousal_ccc_after']:.3f}, "
                      f"step {1e3 * r['step_time_s']:.1f} ms", flush=True)
    keys = [k for k in runs[0] if k not in ("form", "gamma", "seed", "tol")]
    summary = {form: {str(g): {k: R.mean_spread([r[k] for r in runs if (r["form"], r["gamma"]) == (form, g)])
                               for k in keys}
                      for g in dict.fromkeys(r["gamma"] for r in runs if r["form"] == form)} for form in FORMS}
    _plot(summary, f"{out}/tradeoff.png")
    return dict(runs=runs, summary=summary), report(summary, s)


def report(summary: dict, s: dict) -> str:
    cols = ["params_after", "rank_after", "valence_ccc_before", "valence_ccc_after", "arousal_ccc_before",
            "arousal_ccc_after", "class_accuracy_after", "lambda_abs_mean", "factor_out_norm_mean", "step_time_s"]
    first = next(iter(summary["proximal"].values()))
    lines = [__doc__.split("\n\n", 1)[1].strip(), "", f"Settings: {s}; Adam lr {LR}. Unpruned model: "
             f"{int(first['params_before'][0]):,} parameters, total CP rank {int(first['rank_before'][0])}. "
             f"Means over {len(s['seeds'])} seed(s). Step times: compare them only within this report "
             "(see the load average above)."]
    for form in FORMS:
        rows = []
        for g, m in summary[form].items():
            rows.append([g] + [int(round(m[c][0])) if c in ("params_after", "rank_after") else
                               f"{1e3 * m[c][0]:.1f} ms" if c == "step_time_s" else float(m[c][0]) for c in cols])
        tol = 0.0 if form == "proximal" else s["tol"]
        lines += ["", f"Lasso as {'the proximal step after Adam' if form == 'proximal' else 'a loss term (the paper)'}"
                  f", pruned at |lambda| <= {tol:g}:", "",
                  R.table(["gamma", "params kept", "total rank kept", "valence CCC before", "valence CCC after",
                           "arousal CCC before", "arousal CCC after", "class acc. after", "mean abs lambda",
                           "mean factor_out column norm", "train step (pruned)"],
                          rows)]
    lines += ["", "![trade-off](tradeoff.png)"]
    return "\n".join(lines)


def _plot(summary: dict, path: str) -> None:
    def draw(axes):
        for form, marker in zip(FORMS, ("o", "s")):
            kept = [m["params_after"][0] for m in summary[form].values()]
            for target in METRICS:
                axes[0].plot(kept, [m[f"{target}_after"][0] for m in summary[form].values()], marker=marker,
                             label=f"{target} ({form})")
            for g, k, m in zip(summary[form], kept, summary[form].values()):
                axes[0].annotate(f"γ={float(g):g}", (k, m["arousal_ccc_after"][0]), fontsize=7)
            axes[1].plot(kept, [1e3 * m["step_time_s"][0] for m in summary[form].values()], marker=marker, label=form)
        axes[0].set_xlabel("parameters kept after prune_rank")
        axes[0].set_ylabel("test score after pruning")
        axes[0].legend(fontsize=6)
        axes[1].set_xlabel("parameters kept after prune_rank")
        axes[1].set_ylabel("train step of the pruned model (ms)")
        axes[1].legend(fontsize=7)
        for ax in axes:
            ax.grid(alpha=0.3)
    R.figure(path, draw, ncols=2)
