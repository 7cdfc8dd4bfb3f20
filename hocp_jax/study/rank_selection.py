"""Study 2, automatic rank selection: sweep the lasso strength gamma on the CP lambdas.

For every gamma a static HO-CP ResNet is trained on ``digits_affect`` with Adam followed by the
proximal lasso step :func:`hocp_jax.optim.prox_l1_lambdas` (threshold ``lr * gamma`` per step, which
gives exact zeros; no separate penalty term, so the lasso is applied once). Then
:func:`hocp_jax.pruning.prune_rank` (threshold 0) drops the zeroed rank components
(factors, lambda and Psi/BN slices). Reported per gamma: parameters before/after pruning, the
zeroed fraction (:func:`hocp_jax.optim.sparsity_report`), test CCC and class accuracy before
and after pruning (equal up to float summation order: only exact zeros are dropped), and the
measured median time of one jitted train step (batch of 32 images) of the pruned model.
"""

from __future__ import annotations


from hocp_jax import optim, pruning
from hocp_jax.study import runner as R

SETTINGS = {
    "tiny": dict(widths=(4, 4, 8, 8), gammas=(0.0, 100.0), seeds=(0,), static_steps=4, n_test=20, repeats=2),
    "quick": dict(widths=(8, 8, 16, 16), gammas=(0.0, 0.3, 1.0, 3.0), seeds=(0,), static_steps=300, n_test=300,
                  repeats=10),
    "full": dict(widths=(8, 8, 16, 16), gammas=(0.0, 0.1, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 3.0, 10.0),
                 seeds=(0, 1), static_steps=800, n_test=300, repeats=20),
}
METRICS = ("valence_ccc", "arousal_ccc", "class_accuracy")
LR, BATCH = 3e-3, 32


def run(s: dict, out: str) -> tuple[dict, str]:
    test = R.subset(R.dataset("digits_affect", "test"), s["n_test"])
    batch = R.subset(R.dataset("digits_affect", "train"), BATCH)
    runs = []
    for gamma in s["gammas"]:
        for seed in s["seeds"]:
            model, v = R.static_model(s["widths"], steps=s["static_steps"], seed=seed, gamma=gamma, lr=LR)
            sparsity = optim.sparsity_report(v["params"])
            params, stats, rep = pruning.prune_rank(v["params"], 0.0, v.get("batch_stats"))
            pruned = {"params": params, "batch_stats": stats}
            before, after = R.evaluator(model)(v, test), R.evaluator(model)(pruned, test)
            tr = R.trainer(model, f"adam {LR} lasso 0.0", lambda: R.adam(LR))
            runs.append(dict(gamma=gamma, seed=seed, params_before=rep.params_before, params_after=rep.params_after,
                             rank_before=sum(layer.rank_before for layer in rep.layers),
                             rank_after=sum(layer.rank_after for layer in rep.layers),
                             zeroed_lambdas=sparsity.zeroed, params_freed=sparsity.params_freed,
                             step_time_s=tr.step_time(pruned, batch, s["repeats"]))
                        | {f"{k}_before": before[k] for k in METRICS} | {f"{k}_after": after[k] for k in METRICS})
            r = runs[-1]
            print(f"[rank_selection] gamma {gamma} seed {seed}: params {r['params_before']} -> {r['params_after']}, "
                  f"arousal {r['arousal_ccc_before']:.3f} -> {r['arousal_ccc_after']:.3f}, "
                  f"step {1e3 * r['step_time_s']:.1f} ms", flush=True)
    keys = [k for k in runs[0] if k not in ("gamma", "seed")]
    summary = {str(g): {k: R.mean_spread([r[k] for r in runs if r["gamma"] == g]) for k in keys} for g in s["gammas"]}
    _plot(summary, s["gammas"], f"{out}/tradeoff.png")
    return dict(runs=runs, summary=summary), report(summary, s)


def report(summary: dict, s: dict) -> str:
    cols = ["params_after", "rank_after", "valence_ccc_before", "valence_ccc_after", "arousal_ccc_before",
            "arousal_ccc_after", "class_accuracy_after", "step_time_s"]
    rows = []
    for g, m in summary.items():
        rows.append([g] + [int(round(m[c][0])) if c in ("params_after", "rank_after") else
                           f"{1e3 * m[c][0]:.1f} ms" if c == "step_time_s" else float(m[c][0]) for c in cols])
    first = next(iter(summary.values()))
    lines = [__doc__.split("\n\n", 1)[1].strip(), "", f"Settings: {s}; Adam lr {LR}. Unpruned model: "
             f"{int(first['params_before'][0]):,} parameters, total CP rank {int(first['rank_before'][0])}. "
             f"Means over {len(s['seeds'])} seed(s). Step times: compare them only within this table "
             "(see the load average above).", "",
             R.table(["gamma", "params kept", "total rank kept", "valence CCC before", "valence CCC after",
                      "arousal CCC before", "arousal CCC after", "class acc. after", "train step (pruned)"], rows),
             "", "![trade-off](tradeoff.png)"]
    return "\n".join(lines)


def _plot(summary: dict, gammas, path: str) -> None:
    def draw(axes):
        kept = [summary[str(g)]["params_after"][0] for g in gammas]
        for target in METRICS:
            axes[0].plot(kept, [summary[str(g)][f"{target}_after"][0] for g in gammas], marker="o", label=target)
        for g, k in zip(gammas, kept):
            axes[0].annotate(f"γ={g:g}", (k, summary[str(g)]["arousal_ccc_after"][0]), fontsize=7)
        axes[0].set_xlabel("parameters kept after prune_rank")
        axes[0].set_ylabel("test score after pruning")
        axes[0].legend(fontsize=7)
        axes[1].plot(kept, [1e3 * summary[str(g)]["step_time_s"][0] for g in gammas], marker="o")
        axes[1].set_xlabel("parameters kept after prune_rank")
        axes[1].set_ylabel("train step of the pruned model (ms)")
        for ax in axes:
            ax.grid(alpha=0.3)
    R.figure(path, draw, ncols=2)
