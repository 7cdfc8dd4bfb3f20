"""Dense -> HO-CP conversion of a trained model on the embedded data, accuracy before/after.

Trains a tiny dense ResNet-18 (``get_model("resnet18", tiny=True)``, classification of the
digit + valence/arousal) on ``digits_affect`` (built offline from scikit-learn's digits),
converts its variables with :func:`hocp_jax.conversion.dense_to_hocp` at several ranks (no
fine-tuning) and prints the per-layer CP reconstruction errors and the test metrics of the
dense model and of ``get_model("resnet18_hocp", tiny=True)`` on the converted variables.

    PYTHONPATH=. python benchmarks/convert_dense_to_hocp.py --epochs 8 --ranks budget 8 4
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hocp_jax import losses, metrics
from hocp_jax.conversion import dense_to_hocp
from hocp_jax.data.embedded import make_digits_affect
from hocp_jax.models import count_params, get_model

HEAD = dict(n_outputs=2, n_classes=10)


def _data(split):
    d = make_digits_affect(split)
    return d["image"].astype(np.float32) / 255.0, d["va"], d["label"]


def train(model, x, va, label, *, epochs: int, batch: int = 50, seed: int = 0):
    variables = model.init(jax.random.key(seed), x[:2])
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, opt, xb, vab, lb):
        def loss_fn(p):
            out, upd = model.apply({"params": p, "batch_stats": stats}, xb, True, mutable=["batch_stats"])
            loss = losses.cross_entropy(out["logits"], lb) + jnp.mean((out["va"] - vab) ** 2)
            return loss, upd["batch_stats"]
        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), stats, opt, loss

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            params, stats, opt, loss = step(params, stats, opt, x[idx], va[idx], label[idx])
    return {"params": params, "batch_stats": stats}


def evaluate(model, variables, x, va, label) -> dict:
    out = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    return {"accuracy": float(np.mean(np.argmax(out["logits"], -1) == label)),
            "ccc_valence": float(metrics.ccc(va[:, 0], out["va"][:, 0])),
            "ccc_arousal": float(metrics.ccc(va[:, 1], out["va"][:, 1]))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--ranks", nargs="+", default=["budget", "8", "4"], help="'budget' or ints")
    parser.add_argument("--n-iter", type=int, default=500, help="CP-ALS sweeps per layer (at most)")
    args = parser.parse_args()
    bad = [r for r in args.ranks if r != "budget" and not (r.isdigit() and int(r) > 0)]
    if bad or args.n_iter < 0 or args.epochs < 0:  # before the training, not after it
        parser.error(f"--ranks {bad}: expected 'budget' or ints > 0" if bad else "--n-iter and --epochs: expected ints >= 0")
    dense, hocp = get_model("resnet18", tiny=True, head=HEAD), get_model("resnet18_hocp", tiny=True, head=HEAD)
    train_x, train_va, train_label = _data("train")
    test = _data("test")
    t0 = time.time()
    variables = train(dense, train_x, train_va, train_label, epochs=args.epochs)
    print(f"trained dense tiny ResNet-18 ({count_params(variables)} params) for {args.epochs} epochs "
          f"in {time.time() - t0:.0f} s")
    rows = [("dense", count_params(variables), None, evaluate(dense, variables, *test))]
    for rank in args.ranks:
        rank = rank if rank == "budget" else int(rank)
        t0 = time.time()
        converted, errors = dense_to_hocp(variables, rank, n_iter=args.n_iter)
        print(f"\nrank={rank}: converted in {time.time() - t0:.0f} s; relative reconstruction error per layer:")
        for path, err in errors.items():
            print(f"  {path:18s} {err:.3f}")
        rows.append((f"HO-CP rank={rank}", count_params(converted), max(errors.values()),
                     evaluate(hocp, converted, *test)))
    print("\n| model (test split, 300 images) | params | max layer error | accuracy | CCC valence | CCC arousal |")
    print("|---|---|---|---|---|---|")
    for name, n, err, m in rows:
        err = "-" if err is None else f"{err:.3f}"
        print(f"| {name} | {n} | {err} | {m['accuracy']:.3f} | {m['ccc_valence']:.3f} | {m['ccc_arousal']:.3f} |")


if __name__ == "__main__":
    main()
