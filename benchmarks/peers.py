"""Peer implementations timed in the same run as hocp-jax: PyTorch dense conv and TensorLy-Torch's CP conv.

Optional: needs the ``bench`` extra (``pip install -e '.[bench]'``: CPU ``torch`` and
``tensorly-torch``). :func:`available` says whether they are installed; the benchmark skips the
peers with a message otherwise.

Each peer is a zero-argument callable doing one training-style fwd+bwd: forward, then
``backward(cot)`` from a fixed random cotangent of the output's shape (as the JAX paths do,
:func:`benchmarks.bench.cotangent`); gradients w.r.t. every parameter and, only if
``input_grad``, w.r.t. the input (the network's first layer gets none, as in a train step).
PyTorch runs in its native channels-first layout (``(B, C, *S)``) on ``torch.set_num_threads(n)``
threads with ``n`` the number of cores JAX's CPU client uses; or, with ``device="cuda"`` (what
:mod:`benchmarks.bench` asks for when JAX runs on a GPU), on the GPU, each call ending in
``torch.cuda.synchronize()`` as a JAX call ends in ``block_until_ready``, with TensorFloat-32
allowed in PyTorch's float32 matrix products and convs (:func:`set_precision`) to match JAX's
default float32 precision on NVIDIA GPUs.

The benchmark runs the peers in a process of their own (:class:`PeerProcess`, this module run as
``python -m benchmarks.peers``), driven over pipes one call at a time, so their calls still
interleave with the JAX paths' in the same rounds, and neither library shares a process, an
allocator or thread pools with the other, as in a user's program. (Scratch runs had shown JAX
calls slower right after a PyTorch call in the same process; ``python -m
benchmarks.experiments coresidence 10``, which interleaves the cases, did not reproduce it; the
JAX path timed there also has slow phases of its own, benchmarks/EXPERIMENTS.md, "Two speeds".)
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from typing import Any

PEERS = ("torch dense", "tltorch cp reconstructed", "tltorch cp factorized")
DEVICES = ("cpu", "cuda")


def available() -> str | None:
    """``None`` if torch and tltorch are installed, else the reason (for the skip message). Does not
    import them: the calling process stays free of PyTorch (module docstring)."""
    missing = [m for m in ("torch", "tltorch") if importlib.util.find_spec(m) is None]
    if missing:  # the optional extra is not installed
        return f"no module named {', '.join(missing)} (install the optional extra: pip install -e '.[bench]')"
    return None


def versions() -> dict[str, str]:
    import tensorly
    import tltorch
    import torch

    return {"torch": torch.__version__, "tltorch": tltorch.__version__, "tensorly": tensorly.__version__,
            "torch_threads": torch.get_num_threads()}


def set_precision(device: str) -> dict[str, Any]:
    """On ``"cuda"``, allows TensorFloat-32 in PyTorch's float32 matrix products (its convs allow it
    by default), as JAX does by default on NVIDIA GPUs; returns the settings in force."""
    import torch

    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return {"torch_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "torch_cudnn_tf32": torch.backends.cudnn.allow_tf32}


def set_threads() -> int:
    import torch

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(n)
    return n


def conv_peers(case, seed: int = 0, device: str = "cpu") -> dict[str, Callable[[], None]]:
    """fwd+bwd callables of the three peers on ``case`` (a :class:`benchmarks.bench.ConvCase`), on
    ``device`` (``"cpu"`` or ``"cuda"``)."""
    import tltorch
    import torch

    torch.manual_seed(seed)
    n = len(case.in_sizes)
    strides, pads = case.geometry()
    if any(lo != hi for lo, hi in pads):
        raise ValueError(f"case {case.name}: torch peers need symmetric padding, got {pads}")
    padding = tuple(lo for lo, _ in pads)
    x = torch.randn(case.batch, case.c_in, *case.in_sizes).to(device)
    x.requires_grad_(case.input_grad)
    dense_cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[n]
    layers = {"torch dense": dense_cls(case.c_in, case.c_out, case.kernel, stride=strides, padding=padding, bias=False)}
    for impl in ("reconstructed", "factorized"):
        layer = tltorch.FactorizedConv(case.c_in, case.c_out, case.kernel, stride=strides, padding=padding,
                                       factorization="cp", rank=case.rank, implementation=impl)
        layer.reset_parameters(std=(case.c_in * float(torch.tensor(case.kernel).prod())) ** -0.5)
        layers[f"tltorch cp {impl}"] = layer
    layers = {name: layer.to(device) for name, layer in layers.items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    with torch.no_grad():
        cot = torch.randn(layers["torch dense"](x).shape, generator=torch.Generator().manual_seed(1)).to(device)

    def step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(cot)
            sync()

        return run

    return {name: step(layer) for name, layer in layers.items()}


class PeerProcess:
    """The peers in a worker process of their own, driven over pipes (module docstring).

    ``info`` holds the worker's versions and thread count; :meth:`conv_peers` has the worker build
    a case's peers and returns zero-argument callables that each run one peer call there and wait
    for it (a pipe round trip adds well under a millisecond to a call of tens of milliseconds or
    more). Use as a context manager, or :meth:`close`.
    """

    def __init__(self, device: str = "cpu"):
        if device not in DEVICES:
            raise ValueError(f"device={device!r}: expected one of {DEVICES}")
        self._proc = subprocess.Popen([sys.executable, "-m", "benchmarks.peers", device], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        self.info = self._ask({"op": "info"})

    def _ask(self, msg: dict) -> dict:
        self._proc.stdin.write(json.dumps(msg) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer process ended (exit code {self._proc.wait()}); its stderr is above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"peer process: {reply['error']}")
        return reply

    def conv_peers(self, case, keep_others: bool = False) -> dict[str, Callable[[], None]]:
        """Like :func:`conv_peers`, the calls running in the worker process. The worker frees the
        peers of earlier cases first unless ``keep_others``."""
        fields = {f.name: getattr(case, f.name) for f in dataclasses.fields(case)}  # the class may live in __main__
        blob = base64.b64encode(pickle.dumps(fields)).decode()
        names = self._ask({"op": "case", "case": blob, "keep_others": keep_others})["names"]
        calls = {name: functools.partial(self._ask, {"op": "run", "case": case.name, "name": name}) for name in names}
        for call in calls.values():
            call.pid = self._proc.pid  # the process that runs it (bench.time_interleaved counts its page faults)
        return calls

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve(device: str) -> None:
    """The worker of :class:`PeerProcess`: one JSON request per stdin line, one JSON reply per line
    on the original stdout (anything else the libraries print goes to stderr); peers on ``device``."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    threads, cases = set_threads(), {}
    settings = {"torch_device": device} | set_precision(device)
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["op"] == "info":
                reply = versions() | {"torch_threads": threads} | settings
            elif msg["op"] == "case":
                from benchmarks.bench import ConvCase

                if not msg["keep_others"]:
                    cases.clear()  # frees their tensors before the new ones are made
                case = ConvCase(**pickle.loads(base64.b64decode(msg["case"])))
                cases[case.name] = conv_peers(case, device=device)
                reply = {"names": list(cases[case.name])}
            else:
                cases[msg["case"]][msg["name"]]()
                reply = {}
        except Exception as e:  # reported to the parent, which raises it
            reply = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


if __name__ == "__main__":
    _serve(sys.argv[1] if len(sys.argv) > 1 else "cpu")
