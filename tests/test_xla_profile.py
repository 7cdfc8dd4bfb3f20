"""benchmarks.xla_profile: the labels of a compiled train step's instructions, the per-label
times of a trace and the fingerprint of a compiled program. No timings are asserted; the unions
are checked against hand-computed ones."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from benchmarks import xla_profile


def _label(op_name):
    m = re.search(r"/(a|b)/", op_name + "/")
    if m:
        return m.group(1)
    return "update" if op_name.startswith("jit(") and "jvp(" not in op_name else None


class _TwoConvs(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="a")(x))
        return nn.Conv(4, (3, 3), name="b")(x)


def _compiled_step():
    model = _TwoConvs()
    x = jnp.ones((2, 12, 12, 3))
    params = model.init(jax.random.key(0), x)["params"]

    def step(params, x):
        grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2))(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    compiled = jax.jit(step).lower(params, x).compile()
    return compiled, params, x


def test_labels_of_a_compiled_train_step():
    compiled, _, _ = _compiled_step()
    text = compiled.as_text()
    labels = xla_profile.instruction_labels(text, _label)
    # every instruction whose own op_name (or whose fused computation) names a layer keeps it
    for line in text[text.index("ENTRY"):].splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*op_name=\"[^\"]*/(a|b)/", line)
        if m:
            assert labels[m.group(1)] == m.group(2), line
    # every convolution of the step (each layer's forward and weight gradient, b's input
    # gradient) and every layout transpose XLA adds around them (these have no metadata) is
    # attributed to its layer, none to the update or left unlabelled
    conv_computations, computation = set(), None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            head = re.match(r"^(?:ENTRY )?%?([\w.\-]+)", line)
            computation = head.group(1) if head else None
        elif " convolution(" in line and computation:
            conv_computations.add(computation)
    convs, transposes = [], []
    for line in text[text.index("ENTRY"):].splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        called = re.search(r"calls=%([\w.\-]+)", line)
        if m and (" convolution(" in line or (called and called.group(1) in conv_computations)):
            convs.append(labels[m.group(1)])
        elif m and "transpose" in m.group(1):
            transposes.append(labels[m.group(1)])
    assert sorted(set(convs)) == ["a", "b"] and convs.count("a") >= 2 and convs.count("b") >= 3, convs
    assert transposes and set(transposes) <= {"a", "b"}, transposes


def test_unlabelled_instruction_takes_the_layer_of_the_parameter_its_update_reads():
    text = """HloModule m, entry_computation_layout={()->f32[4]{0}}

%fused_computation.1 (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %negate.1 = f32[4]{0} negate(%param_0), metadata={op_name="jit(f)/jvp(M)/x/a/neg"}
}

ENTRY %main (p: f32[4], q: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0), metadata={op_name="state.params[\\'b\\'][\\'kernel\\']"}
  %q = f32[4]{0} parameter(1)
  %fusion.1 = f32[4]{0} fusion(%q), kind=kLoop, calls=%fused_computation.1
  %wgrad = f32[4]{0} multiply(%fusion.1, %q)
  %copy.2 = f32[4]{0} copy(%wgrad)
  ROOT %update = f32[4]{0} add(%copy.2, %p), metadata={op_name="jit(f)/add"}
}
"""
    labels = xla_profile.instruction_labels(text, _label)
    assert labels["fusion.1"] == "a"  # from the computation it calls
    assert labels["update"] == "update"
    # wgrad and copy.2: no metadata; their users lead to the update, which reads b's parameter
    assert labels["wgrad"] == "b" and labels["copy.2"] == "b"
    assert labels["q"] == "a"  # no user with a layer of its own before the operand rule: its user fusion.1


def test_by_label_unions_and_sums():
    events = [("x", 0, 10), ("x", 5, 12), ("x", 20, 25), ("y", 0, 4), ("ThunkExecutor::Execute", 0, 100)]
    out = xla_profile.by_label(events, {"x": "L", "y": "M"}, calls=2)
    assert out["L"]["cpu"] == pytest.approx((10 + 7 + 5) / 1e6 / 2)
    assert out["L"]["wall"] == pytest.approx((12 + 5) / 1e6 / 2)  # [0, 12] and [20, 25]
    assert out["L"]["events"] == 1.5
    assert out["M"] == {"cpu": pytest.approx(4 / 1e6 / 2), "wall": pytest.approx(4 / 1e6 / 2), "events": 0.5}
    assert set(out) == {"L", "M"}


def test_trace_sees_the_instructions_of_a_call():
    compiled, params, x = _compiled_step()
    events, ms = xla_profile.trace(lambda: jax.block_until_ready(compiled(params, x)), 2)
    assert ms > 0
    labels = xla_profile.instruction_labels(compiled.as_text(), _label)
    per = xla_profile.by_label(events, labels, 2)
    assert {"a", "b"} <= set(per)
    assert all(v["cpu"] >= v["wall"] > 0 and v["events"] >= 1 for v in per.values())


@pytest.mark.parametrize("calls", [0, -1, 1.5])
def test_calls_must_be_a_positive_int(calls):
    with pytest.raises(ValueError, match="calls="):
        xla_profile.by_label([], {}, calls)
    with pytest.raises(ValueError, match="calls="):
        xla_profile.trace(lambda: None, calls)


def test_program_fingerprint_tells_programs_apart_but_not_names():
    """Two functions of other names and variable names that compute the same compile to one
    fingerprint; another computation (a sum over other axes) to another; and the unordered
    fingerprint ignores the order of independent instructions that the ordered one keeps."""
    x = jnp.ones((4, 6))

    def first(x):
        return jnp.sum(jnp.tanh(x) * 2.0, axis=0)

    def renamed(values):
        scaled = jnp.tanh(values) * 2.0
        return jnp.sum(scaled, axis=0)

    def fingerprint(f):
        return xla_profile.program_fingerprint(jax.jit(f).lower(x).compile().as_text())

    assert fingerprint(first) == fingerprint(renamed)
    assert fingerprint(first) != fingerprint(lambda x: jnp.sum(jnp.tanh(x) * 2.0, axis=1))
    text = "ENTRY %main (p.1: f32[2]) -> f32[2] {\n  %a.1 = f32[2] negate(%p.1)\n  %b.2 = f32[2] abs(%p.1)\n" \
           "  ROOT %c.3 = f32[2] add(%a.1, %b.2)\n}"
    swapped = text.replace("%a.1 = f32[2] negate(%p.1)\n  %b.2 = f32[2] abs(%p.1)",
                           "%b.2 = f32[2] abs(%p.1)\n  %a.1 = f32[2] negate(%p.1)")
    assert xla_profile.program_fingerprint(text) != xla_profile.program_fingerprint(swapped)
    assert xla_profile.program_fingerprint(text, ordered=False) == xla_profile.program_fingerprint(swapped, ordered=False)
