"""Where a compiled XLA CPU program spends its time, per model layer, from the JAX profiler.

:func:`trace` traces calls of a compiled program with :mod:`jax.profiler` and reads the trace
back with :class:`jax.profiler.ProfileData` (no TensorBoard needed); :func:`by_label` sums the
time of the HLO instructions per label, as CPU time (over all threads) and as wall time.
:func:`instruction_labels` names each instruction of the program's HLO text after the model
layer that made it, from the ``op_name`` metadata JAX writes (e.g. ``jit(train_step)/
transpose(jvp(ResNet))/layer3_1/conv1/dot_general``). XLA emits some instructions without
metadata (the dense convs' weight-gradient convolutions, layout transposes); these take the
label of the nearest instruction that uses their result, else of the nearest one they read,
that has a label. :func:`program_fingerprint` reduces a compiled program's text to what makes it
that program (its instructions, without names and metadata), to tell whether two ways of
writing a function compile to one program.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time
from collections.abc import Callable

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = [^(]*?[\w\-]+\((.*?)\)(?:, |$)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OPERAND = re.compile(r"%([\w.\-]+)")
_PYTREE_KEY = re.compile(r"\[\\?'([^'\\]*)\\?'\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+)")
_CALLS = re.compile(r"calls=%([\w.\-]+)")


def _check_calls(calls: int) -> None:
    if not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls={calls!r}: expected an int >= 1 (the number of traced calls)")


def trace(call: Callable[[], object], calls: int) -> tuple[list[tuple[str, int, int]], float]:
    """``(events, ms)``: ``(name, start_ns, end_ns)`` of every event on the host's threads
    (Python's excepted) in ``calls`` traced runs of ``call()``, which must block until its result
    is ready, and the mean wall ms of one traced run. An instruction that XLA splits across
    threads has an event on each; the runtime's own events (executor, waits) have names that are
    no instruction's, and :func:`by_label` drops them."""
    _check_calls(calls)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            ms = (time.perf_counter() - t0) * 1e3 / calls
        finally:
            jax.profiler.stop_trace()
        (path,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    events = [(event.name, event.start_ns, event.start_ns + event.duration_ns)
              for plane in data.planes if plane.name.startswith("/host:")
              for line in plane.lines if line.name != "python" for event in line.events]
    return events, ms


def instruction_labels(hlo_text: str, label: Callable[[str], str | None],
                       through: frozenset[str] = frozenset({"update"})) -> dict[str, str]:
    """``{instruction name: label}`` for the instructions of ``hlo_text`` (``Compiled.as_text()``).

    ``label(op_name)`` names the layer of one ``op_name`` (``None``: none), with pytree paths
    written as ``/`` paths (``state.params['layer1_0']['conv1']`` -> ``state.params/layer1_0/
    conv1``), so parameters get the label of their layer. A fusion takes the first label found
    in the instructions it calls. An unlabelled instruction takes the label of its nearest
    labelled user (breadth first); users labelled in ``through`` (work outside the model, such as
    the optimizer's update) are searched past, and lend the label of the parameters they read;
    failing that, the label of its nearest labelled operand."""
    own: dict[str, str | None] = {}
    operands: dict[str, list[str]] = {}
    calls: dict[str, str] = {}
    computation_label: dict[str, str] = {}
    computation = None
    for line in hlo_text.splitlines():
        if line and not line.startswith(" "):
            head = _COMPUTATION.match(line)
            computation = head.group(1) if head else None
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name = m.group(1)
        op = _OP_NAME.search(line)
        own[name] = label(_PYTREE_KEY.sub(r"/\1", op.group(1))) if op else None
        operands[name] = _OPERAND.findall(m.group(2))
        called = _CALLS.search(line)
        if called:
            calls[name] = called.group(1)
        if computation and own[name] and own[name] not in through and computation not in computation_label:
            computation_label[computation] = own[name]
    labels = {n: v or computation_label.get(calls.get(n, "")) for n, v in own.items()}
    users: dict[str, list[str]] = collections.defaultdict(list)
    for n, ops in operands.items():
        for o in ops:
            users[o].append(n)

    def model_label(n: str) -> str | None:
        v = labels.get(n)
        return v if v and v not in through else None

    def nearest(start: str, edges: dict[str, list[str]], lend_parameters: bool) -> str | None:
        """Breadth first along ``edges``: the first model label found; with ``lend_parameters``,
        a node labelled in ``through`` lends the label of the parameters it reads."""
        seen, frontier = {start}, [start]
        for _ in range(8):
            frontier = [m for n in frontier for m in edges.get(n, []) if m not in seen]
            seen.update(frontier)
            found = [model_label(m) for m in frontier if model_label(m)]
            if lend_parameters:
                found += [model_label(o) for m in frontier if labels.get(m) in through
                          for o in operands.get(m, []) if not operands.get(o) and model_label(o)]
            if found:
                return found[0]
        return None

    return {n: v or nearest(n, users, True) or nearest(n, operands, False) or "unlabelled"
            for n, v in labels.items()}


def by_label(events: list[tuple[str, int, int]], labels: dict[str, str], calls: int) -> dict[str, dict[str, float]]:
    """Per label, per call, from the :func:`trace` ``events`` of its instructions: ms of ``cpu``
    (summed over threads) and of ``wall`` (the union of their intervals: time during which at
    least one of them ran; labels that ran concurrently both count it), and the number of
    ``events`` (each costs the trace some overhead, which the times include). Events that are no
    instruction are dropped. ``cpu`` is a lower bound: an instruction whose work a library
    spreads over threads that record no event of their own (some of XLA CPU's matrix products:
    their ``cpu`` time can imply more FLOP/s than the machine has) counts only its issuing
    thread's interval; that interval lasts until the work is done, so ``wall`` is unaffected."""
    _check_calls(calls)
    spans: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for name, start, end in events:
        if name in labels:
            spans[labels[name]].append((start, end))
    out = {}
    for label, intervals in spans.items():
        intervals.sort()
        wall, (lo, hi) = 0, intervals[0]
        for start, end in intervals[1:]:
            if start > hi:
                wall, lo = wall + hi - lo, start
            hi = max(hi, end)
        wall += hi - lo
        out[label] = {"cpu": sum(e - s for s, e in intervals) / 1e6 / calls, "wall": wall / 1e6 / calls,
                      "events": len(intervals) / calls}
    return out


def program_fingerprint(hlo_text: str, ordered: bool = True) -> list[str]:
    """The optimised HLO text of a compiled program (``compiled.as_text()``) without what does not
    change what it computes: metadata (op names, source lines, stack frames), the names of the
    module, instructions, parameters and computations, trailing commas; its computations sorted (the text
    orders them by name). Equal fingerprints: the same instructions, shapes, layouts, fusions and
    operand order, in the same order, so one program. ``ordered=False``: each computation's
    instructions sorted too, so two programs that schedule independent instructions in another
    order compare equal."""
    text = re.sub(r"^HloModule [^,\s]+", "HloModule", hlo_text, flags=re.M)
    text = re.sub(r"metadata=\{[^}]*\}", "", text)
    text = re.sub(r"%[A-Za-z_][\w.\-]*", "%v", text)
    text = re.sub(r"\b[A-Za-z_][\w\-]*\.\d+:", "p:", text)  # parameter names in computation headers
    text = re.sub(r"(to_apply|calls)=%v", r"\1", text)
    lines = [line.strip().rstrip(",") for line in text.splitlines()]
    lines = [line for line in lines if line and not re.match(r'^\d+ (\{|")', line)
             and line not in ("FileNames", "FunctionNames", "FileLocations", "StackFrames")]
    blocks, current = [], []
    for line in lines:
        current.append(line)
        if line == "}":
            blocks.append("\n".join(current if ordered else current[:1] + sorted(current[1:-1]) + current[-1:]))
            current = []
    return sorted(blocks) + (current if ordered else sorted(current))
