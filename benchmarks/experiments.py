"""Side-by-side experiments behind the choices in hocp_jax (see RESULTS.md "Ideas measured").

``python -m benchmarks.experiments stem``: HO-CP ResNet-18 2-D train step (8 x 112 x 112) with the
stem told it gets no input gradient (``auto`` -> reconstructed stem, the default now) vs the stem
treated like an inner layer (``auto`` -> factorized stem, the previous behaviour), and the dense
ResNet-18, interleaved in one process. Prints medians and ratios as JSON.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.bench import _loss_fn, compile_jax, time_interleaved
from hocp_jax.models import get_model
from hocp_jax.models.resnet import ResNet, hocp_factory
from hocp_jax.training import TrainState, make_train_step


class ResNetStemWithInputGrad(ResNet):
    """The HO-CP ResNet with its stem treated like an inner layer (``input_grad=True``, the
    previous behaviour): :func:`hocp_factory` sets ``input_grad=False`` for a conv named
    ``"stem"`` only, so the stem is built under another name (parameter names do not matter here)."""

    def factory(self):
        def make(*args, name, **kwargs):
            return hocp_factory(*args, name="stem_with_input_grad" if name == "stem" else name, psi=self.psi,
                                shortcut=self.shortcut, implementation=self.implementation, **kwargs)

        return make


def step_call(model, shape):
    key = jax.random.key(0)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros(shape), train=False))(key)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=shape), jnp.float32),
             "va": jnp.asarray(rng.uniform(-1, 1, size=(shape[0], 2)), jnp.float32)}
    tx = optax.sgd(1e-3, momentum=0.9)
    state = TrainState.create(dict(variables), tx, key)
    return compile_jax(make_train_step(model, _loss_fn("va"), tx), state, batch)[0]


def stem(rounds: int = 7) -> dict:
    shape = (8, 112, 112, 3)
    calls = {"dense": step_call(get_model("resnet18"), shape),
             "hocp (stem: no input grad)": step_call(get_model("resnet18_hocp"), shape),
             "hocp (stem: input grad)": step_call(ResNetStemWithInputGrad(conv="hocp"), shape)}
    t = time_interleaved(calls, rounds, budget_s=1e9)
    ms = {k: v["median_ms"] for k, v in t.items()}
    return {"ms": ms, "ratio_to_dense": {k: v / ms["dense"] for k, v in ms.items()}, "loadavg": os.getloadavg()}


if __name__ == "__main__":
    print(json.dumps({"stem": stem}[sys.argv[1]](), indent=1))
