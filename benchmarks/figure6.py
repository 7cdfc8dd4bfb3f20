r"""Paper Figure 6: GFLOPs of a regular 3-D conv vs the CP higher-order conv (rank 3 and 6 x C_in).

Run ``python -m benchmarks.figure6 [--out benchmarks/figure6.png] [--no-xla]``.

Setting of the paper (Sec. 3): one input of size 32 x 32 x 16 (H x W x T; here laid out
``(1, 16, 32, 32, C_in)``), a 3x3x3 kernel, size-preserving padding ("SAME", stride 1), and
varying input x output channels. Bars: analytic forward FLOPs (2 x multiply-adds) from
:func:`hocp_jax.counting.dense_flops` and :func:`hocp_jax.counting.cp_flops`; markers (unless
``--no-xla``): XLA's ``cost_analysis()`` FLOPs of the compiled forward pass
(:func:`hocp_jax.conv_ops.dense_conv` and ``cp_conv(implementation="factorized")``), compiled
from abstract shapes (nothing is allocated or run). XLA does not count the padded taps of a
dense conv, so its 3-D conv count is (1 - 2/48)(1 - 2/96)^2 = 0.919 of the analytic one (one
of the 3 taps is padding at each border); the
factorized path computes its padded taps and XLA counts them (plus the few padded border rows
of intermediates that XLA's fusion computes).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hocp_jax import conv, conv_ops, counting  # noqa: E402
from benchmarks.bench import compile_without_loops  # noqa: E402

IN_SIZES = (16, 32, 32)  # (T, H, W): the paper's 32 x 32 x 16 input
KERNEL = (3, 3, 3)
MODES = ("t", "h", "w")
CHANNELS = ((16, 16), (16, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256),
            (256, 512), (512, 512))
RANK_MULTIPLES = (3, 6)


def analytic_gflops(c_in: int, c_out: int) -> dict[str, float]:
    """``{"3D-Conv": g, "CP-HOConv-3": g, "CP-HOConv-6": g}`` for one input, in GFLOPs."""
    out = {"3D-Conv": counting.dense_flops(IN_SIZES, c_in, c_out, KERNEL, padding="SAME") / 1e9}
    for m in RANK_MULTIPLES:
        out[f"CP-HOConv-{m}"] = counting.cp_flops(IN_SIZES, c_in, c_out, KERNEL, m * c_in, padding="SAME") / 1e9
    return out


def _cost(fn, *shapes) -> float:
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    # the loops of the CPU rules off: XLA counts a loop's body once (since the factorized path's tiles, the CP
    # markers read 0.08-0.31 of the analytic count here; stop 79's audit)
    ca = compile_without_loops(fn, *args).cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"])


def xla_gflops(c_in: int, c_out: int) -> dict[str, float]:
    """XLA ``cost_analysis`` forward GFLOPs of the same three convs."""
    x = (1, *IN_SIZES, c_in)
    out = {"3D-Conv": _cost(lambda x, k: conv_ops.dense_conv(x, k, padding="SAME"), x, (*KERNEL, c_in, c_out)) / 1e9}
    for m in RANK_MULTIPLES:
        r = m * c_in

        def f(x, lam, u_in, u_out, ut, uh, uw):
            p = {"lambda": lam, "factor_in": u_in, "factor_out": u_out, "factor_t": ut, "factor_h": uh, "factor_w": uw}
            return conv.cp_conv(x, p, modes=MODES, padding="SAME", implementation="factorized")

        out[f"CP-HOConv-{m}"] = _cost(f, x, (r,), (c_in, r), (c_out, r), (3, r), (3, r), (3, r)) / 1e9
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/figure6.png")
    ap.add_argument("--no-xla", action="store_true", help="skip the XLA cost_analysis cross-check")
    args = ap.parse_args(argv)
    labels = [f"{a}x{b}" for a, b in CHANNELS]
    ana = [analytic_gflops(a, b) for a, b in CHANNELS]
    xla = None if args.no_xla else [xla_gflops(a, b) for a, b in CHANNELS]
    series = list(ana[0])

    print("| C_in x C_out | " + " | ".join(f"{s} GFLOPs" for s in series) + (" | XLA / analytic |" if xla else " |"))
    print("|---|" + "---:|" * (len(series) + (1 if xla else 0)))
    for i, lab in enumerate(labels):
        row = " | ".join(f"{ana[i][s]:.3f}" for s in series)
        ratios = " | " + ", ".join(f"{xla[i][s] / ana[i][s]:.3f}" for s in series) if xla else ""
        print(f"| {lab} | {row}{ratios} |")

    fig, ax = plt.subplots(figsize=(10, 4.5))
    pos = np.arange(len(labels))
    width = 0.8 / len(series)
    colors = ("tab:gray", "tab:blue", "tab:orange")
    for j, (s, c) in enumerate(zip(series, colors)):
        xs = pos + (j - (len(series) - 1) / 2) * width
        ax.bar(xs, [a[s] for a in ana], width, label=s, color=c)
        if xla:
            ax.plot(xs, [v[s] for v in xla], "k.", ms=4, label="XLA cost_analysis" if j == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(pos, labels, rotation=30)
    ax.set_xlabel("input x output channels")
    ax.set_ylabel("GFLOPs (forward, 1 input 32x32x16, 3x3x3)")
    ax.set_title("Figure 6: regular 3-D conv vs CP higher-order conv (rank 3 and 6 x C_in)")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return {"labels": labels, "analytic": ana, "xla": xla}


if __name__ == "__main__":
    main()
