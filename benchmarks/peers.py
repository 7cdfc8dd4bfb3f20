"""Peer implementations timed in the same run as hocp-jax: PyTorch dense conv and TensorLy-Torch's CP conv.

Optional: needs the ``bench`` extra (``pip install -e '.[bench]'``: CPU ``torch`` and
``tensorly-torch``). :func:`available` says whether they import; the benchmark skips the
peers with a message otherwise.

Each peer is a zero-argument callable doing one training-style fwd+bwd: forward, then
``backward(cot)`` from a fixed random cotangent of the output's shape (as the JAX paths do,
:func:`benchmarks.bench.cotangent`); gradients w.r.t. every parameter and, only if
``input_grad``, w.r.t. the input (the network's first layer gets none, as in a train step).
PyTorch runs in its native channels-first layout (``(B, C, *S)``) on ``torch.set_num_threads(n)``
threads with ``n`` the number of cores JAX's CPU client uses.
"""

from __future__ import annotations

import os
from collections.abc import Callable

PEERS = ("torch dense", "tltorch cp reconstructed", "tltorch cp factorized")


def available() -> str | None:
    """``None`` if torch and tltorch import, else the reason (for the skip message)."""
    try:
        import tltorch  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:  # the optional extra is not installed
        return f"{e} (install the optional extra: pip install -e '.[bench]')"
    return None


def versions() -> dict[str, str]:
    import tensorly
    import tltorch
    import torch

    return {"torch": torch.__version__, "tltorch": tltorch.__version__, "tensorly": tensorly.__version__,
            "torch_threads": torch.get_num_threads()}


def set_threads() -> int:
    import torch

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(n)
    return n


def conv_peers(case, seed: int = 0) -> dict[str, Callable[[], None]]:
    """fwd+bwd callables of the three peers on ``case`` (a :class:`benchmarks.bench.ConvCase`)."""
    import tltorch
    import torch

    torch.manual_seed(seed)
    n = len(case.in_sizes)
    strides, pads = case.geometry()
    if any(lo != hi for lo, hi in pads):
        raise ValueError(f"case {case.name}: torch peers need symmetric padding, got {pads}")
    padding = tuple(lo for lo, _ in pads)
    x = torch.randn(case.batch, case.c_in, *case.in_sizes)
    x.requires_grad_(case.input_grad)
    dense_cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[n]
    layers = {"torch dense": dense_cls(case.c_in, case.c_out, case.kernel, stride=strides, padding=padding, bias=False)}
    for impl in ("reconstructed", "factorized"):
        layer = tltorch.FactorizedConv(case.c_in, case.c_out, case.kernel, stride=strides, padding=padding,
                                       factorization="cp", rank=case.rank, implementation=impl)
        layer.reset_parameters(std=(case.c_in * float(torch.tensor(case.kernel).prod())) ** -0.5)
        layers[f"tltorch cp {impl}"] = layer

    with torch.no_grad():
        cot = torch.randn(layers["torch dense"](x).shape, generator=torch.Generator().manual_seed(1))

    def step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(cot)

        return run

    return {name: step(layer) for name, layer in layers.items()}
