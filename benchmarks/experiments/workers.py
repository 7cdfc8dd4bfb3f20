"""Experiments that need one process per setting (XLA flags, allocator variables) or several
processes alike: worker processes that compile a suite of calls and run them on request, timed
by the parent in interleaved rounds."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

from benchmarks.experiments.common import resnet2d_cases, stack_sums


XLA_FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnn graph fusion": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "ynn without reduce": "--xla_cpu_experimental_ynn_fusion_type=-reduce",
    "fast math": "--xla_cpu_enable_fast_math=true",
    # stop 62: XLA's elementwise code in 512-bit vectors (its default prefers 256) on AVX-512 hosts
    "vector width 512": "--xla_cpu_prefer_vector_width=512",
    # stop 62: matrix products by XLA's own (Eigen) runtime, not YNNPACK
    "ynn without dot": "--xla_cpu_experimental_ynn_fusion_type=-dot",
}


def _worker_calls(suite: str) -> dict:
    """The zero-argument calls of ``suite``, compiled in this process: ``"stack"``, the Jester stack
    layers (dense, auto); ``"stack+peers"``, those plus the PyTorch/TensorLy-Torch peers (``bench``
    extra); ``"steps"``, the three train-step pairs of :func:`benchmarks.bench.model_cases`;
    ``"steps2d"``, its ResNet-18 2-D pair."""
    from benchmarks import bench, peers

    calls = {}
    if suite == "stack sharded":
        calls = _sharded_stack_calls()
    elif suite == "jester steps sharded":
        calls = _sharded_jester_steps()
    elif suite.startswith("stack"):
        # the peers in a process of their own, a child of this worker with its environment (peers.PeerProcess)
        peer_proc = peers.PeerProcess() if suite == "stack+peers" else None
        for case in bench.jester_cases(False):
            kernel, params, compile_call = bench.case_compiler(case)
            fns = bench.conv_fns(case)
            for path, w in (("dense", kernel), ("auto", params)):
                calls[f"{case.name} {path}"] = compile_call(fns[path], w)[0]
            if peer_proc:  # every layer's peers stay alive: the rounds interleave all layers
                calls |= {f"{case.name} {k}": v for k, v in peer_proc.conv_peers(case, keep_others=True).items()}
    elif suite in ("steps", "steps2d"):
        cases = resnet2d_cases() if suite == "steps2d" else bench.model_cases(False)
        calls = {case.name: bench.prepare_model_case(case)[0] for case in cases}
    else:
        raise ValueError(f"suite={suite!r}: expected 'stack', 'stack+peers', 'stack sharded', 'jester steps sharded', "
                         "'steps' or 'steps2d'")
    return calls


def _sharded_stack_calls() -> dict:
    """The Jester stack layers (``bench`` protocol, dense and ``auto``) with the batch split over
    this process's devices under ``jax.shard_map`` (weights replicated; their gradients summed
    over the shards) and, with several devices, ``auto`` again with each device's share of the
    batch forced one sample at a time (``per_sample_mode(True)``; the automatic rule has done so
    inside ``shard_map`` since stop 52, and ran each share whole before); with one device, the
    programs of the ``"stack"`` suite."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from benchmarks import bench
    from hocp_jax import conv_plans

    n = jax.device_count()
    if n == 1:
        return _worker_calls("stack")
    mesh = jax.make_mesh((n,), ("batch",))
    split = NamedSharding(mesh, P("batch"))
    variants = {"dense": None, "auto": None, "auto per sample": True}
    calls = {}
    for case in bench.jester_cases(False):
        x, kernel, params = bench.make_inputs(case)
        fns = bench.conv_fns(case)
        cot = bench.cotangent(fns["dense"], x, kernel)
        for label, per_sample in variants.items():
            path, w = ("dense", kernel) if label == "dense" else ("auto", params)
            grads = bench.fwd_bwd(fns[path], case.input_grad)

            def local(x, w, cot, grads=grads):  # the loss summed over the shards; JAX sums w's gradient
                value, g = grads(x, w, cot)
                return jax.lax.psum(value, "batch"), g

            out_specs = (P(), (P("batch"), P())) if case.input_grad else (P(), P())
            fn = jax.shard_map(local, mesh=mesh, in_specs=(P("batch"), P(), P("batch")), out_specs=out_specs)
            with conv_plans.per_sample_mode(per_sample):
                calls[f"{case.name} {label}"] = bench.compile_jax(fn, jax.device_put(x, split), w, jax.device_put(cot, split))[0]
    return calls


def _sharded_jester_steps() -> dict:
    """``bench``'s Jester train-step pair (dense, HO-CP; 2 clips) under ``jit`` as ``train.py``
    runs it: state replicated, batch split over this process's devices (an auto-axis mesh,
    ``autotune.configure(batch_shards=n)``); with several devices the HO-CP step twice, traced
    on its mesh as ``fit`` does (``training.sharding.on_mesh``, since stop 53: the CP convs run
    each device's share with their loops) and without (each share whole, as before)."""
    import jax

    from benchmarks import bench
    from hocp_jax import autotune
    from hocp_jax.training import sharding

    n = jax.device_count()
    mesh = sharding.make_data_mesh()
    autotune.configure(batch_shards=n)
    calls = {}
    for case in bench.model_cases(False):
        if not case.name.startswith("jester"):
            continue
        step, state, batch = bench.model_step(case)
        args = sharding.put_replicated(state, mesh), sharding.put_batch(jax.device_get(batch), mesh)
        variants = {"": True} if n == 1 or case.name == "jester dense" else {" on mesh": True, " off mesh": False}
        for suffix, traced_on_mesh in variants.items():
            compile_jax = sharding.on_mesh(bench.compile_jax, mesh) if traced_on_mesh else bench.compile_jax
            calls[case.name + suffix] = compile_jax(step, *args)[0]
    autotune.configure()
    return calls


def worker(suite: str) -> None:
    """Compiles ``suite``'s calls under this process's environment, then runs the call named on
    each stdin line and answers its wall time in ms."""
    calls = _worker_calls(suite)
    for call in calls.values():
        call()  # warm-up
    print(json.dumps(sorted(calls)), flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        calls[line.strip()]()
        print(1e3 * (time.perf_counter() - t0), flush=True)


def _run_in_workers(envs: dict[str, dict], suite: str, rounds: int, gap_s: float = 0.0,
                    record: dict | None = None, probe=None) -> tuple[dict, list]:
    """Times ``suite`` in one worker process per environment in ``envs`` (``{label: env}``).

    Environment settings (XLA flags, allocator variables) are per process, so each runs in its own
    worker; the parent times the workers' calls in interleaved, rotated rounds, one call at a time
    with ``gap_s`` seconds between calls, so load from elsewhere hits all settings alike.
    Returns the medians ``{(label, name): ms}`` and the call names (of all workers); with ``record``, it also gets
    each call's times ``{(label, name): {"ms": [...], "roundtrip_ns": [...]}}``, the round trips
    read by ``probe()`` (:class:`benchmarks.placement.CrossCoreProbe`) right before each call.
    """
    workers = {}
    for label, env in envs.items():
        workers[label] = subprocess.Popen([sys.executable, "-m", "benchmarks.experiments", "_worker", suite], env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    names = {label: json.loads(w.stdout.readline()) for label, w in workers.items()}
    jobs = [(label, name) for label in workers for name in names[label]]
    times: dict = {job: [] for job in jobs}
    for rnd in range(rounds):
        for label, name in jobs[rnd % len(jobs):] + jobs[:rnd % len(jobs)]:
            time.sleep(gap_s)
            roundtrip = probe() if probe else None
            workers[label].stdin.write(name + "\n")
            workers[label].stdin.flush()
            times[(label, name)].append(float(workers[label].stdout.readline()))
            if record is not None:
                job = record.setdefault((label, name), {"ms": [], "roundtrip_ns": []})
                job["ms"].append(round(times[(label, name)][-1], 1))
                job["roundtrip_ns"].append(round(roundtrip or 0.0, 1))
    for w in workers.values():
        w.stdin.close()
        w.wait()
    return {job: statistics.median(t) for job, t in times.items()}, sorted(set().union(*names.values()))


def _with_probe(envs: dict[str, dict], suite: str, rounds: int) -> tuple[dict, dict, float | None]:
    """:func:`_run_in_workers` with the cross-core round trip before each call: ``(medians,
    record, cut)`` (``cut``: the round trip above which the CPUs count as far apart,
    :func:`benchmarks.placement.split_cut`)."""
    from benchmarks import placement

    record: dict = {}
    with placement.CrossCoreProbe() as probe:
        med, _ = _run_in_workers(envs, suite, rounds, record=record, probe=probe.roundtrip_ns)
    cut = placement.split_cut(v for job in record.values() for v in job["roundtrip_ns"])
    return med, record, cut


def _by_placement(labels: list[str], record: dict, cut: float | None, paths: tuple[str, ...]) -> dict:
    """Each call's medians over its calls with the CPUs close (``shared``) and far apart
    (``split``), and per setting the stack's (the sum of its layers' medians in that placement;
    ``None`` where a layer had no call there). Empty without a ``cut``."""
    from benchmarks import placement

    if cut is None:
        return {}
    by = {job: placement.medians_by_placement(r["ms"], r["roundtrip_ns"], cut) for job, r in record.items()}
    return {"split_above_ns": round(cut, 1),
            "by_placement": {f"{label} | {name}": v for (label, name), v in by.items()},
            "stack_by_placement": {label: {where: {
                k: None if math.isnan(v) else v
                for k, v in stack_sums({n: b[where]["median"] or math.nan for (lab, n), b in by.items() if lab == label},
                                       paths).items() if v}
                for where in ("shared", "split")} for label in labels}}


def xla_flags(rounds: int = 3) -> dict:
    envs = {label: dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
            for label, flags in XLA_FLAG_SETS.items()}
    med, record, cut = _with_probe(envs, "stack", rounds)
    names = sorted({name for _, name in med})
    stack = {label: stack_sums({n: med[(label, n)] for n in names}, ("dense", "auto")) for label in envs}
    base = stack["default"]["dense"]
    return {"flags": XLA_FLAG_SETS, "rounds": rounds, "stack_ms": stack,
            "stack_ratio_to_default_dense": {k: {p: v / base for p, v in d.items()} for k, d in stack.items()},
            "auto/dense per setting": {k: d["auto"] / d["dense"] for k, d in stack.items()},
            "layer_ms": {f"{label} | {name}": ms for (label, name), ms in med.items()},
            **_by_placement(list(envs), record, cut, ("dense", "auto")),
            "loadavg": os.getloadavg()}


def _on_one_and_two_devices(suite: str, rounds: int) -> tuple[dict, dict, dict, float | None]:
    """``suite`` in a worker on one host device and in one on two
    (``--xla_force_host_platform_device_count``), interleaved, the cross-core round trip before each
    call: ``(envs, medians, record, cut)`` (:func:`_run_in_workers`; ``cut``: the round trip above
    which the CPUs count as far apart, :func:`benchmarks.placement.split_cut`)."""
    base = os.environ.get("XLA_FLAGS", "")
    envs = {f"{n} device{'s' * (n > 1)}": dict(os.environ, XLA_FLAGS=f"{base} --xla_force_host_platform_device_count={n}".strip())
            for n in (1, 2)}
    return envs, *_with_probe(envs, suite, rounds)


def host_devices(rounds: int = 12) -> dict:
    """The Jester stack (``"stack sharded"`` suite) in a worker on one host device (the default)
    and in one on two (``--xla_force_host_platform_device_count=2``, the batch split over them
    under ``shard_map``), interleaved, with the cross-core round trip before each call: whether
    giving each vCPU its own share of the batch removes the factorized path's placement
    sensitivity (EXPERIMENTS.md, "Two speeds"), and at what cost. Per setting: the stack's and
    each layer's medians, and each call's medians over the calls with the CPUs close and far apart."""
    envs, med, record, cut = _on_one_and_two_devices("stack sharded", rounds)
    labels = ("dense", "auto", "auto per sample")
    out = {"rounds": rounds, "stack_ms": {}, "layer_ms": {f"{label} | {name}": ms for (label, name), ms in med.items()}}
    for label in envs:
        stack = stack_sums({n: ms for (lab, n), ms in med.items() if lab == label}, labels)
        out["stack_ms"][label] = {k: v for k, v in stack.items() if v}
    out |= _by_placement(list(envs), record, cut, labels)
    out["calls"] = {f"{label} | {name}": r for (label, name), r in record.items()}
    out["loadavg"] = os.getloadavg()
    return out


def jit_devices(rounds: int = 11) -> dict:
    """``bench``'s Jester train steps (``"jester steps sharded"`` suite) as ``train.py`` runs them
    under ``jit``, in a worker on one host device and in one on two
    (``--xla_force_host_platform_device_count=2``, the batch split over them), interleaved, with
    the cross-core round trip before each call: what the CP convs' per-device programs
    (:func:`hocp_jax.conv_plans.batch_split`, stop 53) buy a train step on a device per vCPU. Per
    call: the median, and the medians over the calls with the CPUs close and far apart."""
    from benchmarks import placement

    _, med, record, cut = _on_one_and_two_devices("jester steps sharded", rounds)
    out = {"rounds": rounds, "step_ms": {f"{label} | {name}": ms for (label, name), ms in med.items()}}
    if cut is not None:
        out["split_above_ns"] = round(cut, 1)
        out["by_placement"] = {f"{label} | {name}": placement.medians_by_placement(r["ms"], r["roundtrip_ns"], cut)
                               for (label, name), r in record.items()}
    out["calls"] = {f"{label} | {name}": r for (label, name), r in record.items()}
    out["loadavg"] = os.getloadavg()
    return out


# Allocator settings of glibc's malloc, which both XLA's CPU runtime and PyTorch allocate their
# buffers with. By default a buffer over the (dynamic) mmap threshold, or any buffer allocated
# from a thread other than the main one (XLA's runtime threads allocate from their own arenas,
# which serve large requests by mmap), is mapped fresh on every call and freed with munmap: each
# call then page-faults its whole working set in again (seen from the minor-fault count per call
# in a scratch session). "mmap from 1 GiB" (stop 45) keeps the arenas but raises the mmap
# threshold, and "no mmap" (stop 54) keeps them and turns mmap off, freed memory never trimmed:
# buffers that an arena's heap can hold are then reused. A thread arena's heaps hold at most
# 64 MiB each, and glibc serves a larger request of such a thread with a fresh mmap whatever the
# settings say, so XLA's large buffers, allocated on its runtime threads, still fault in on every
# call under both (PyTorch's, from the main thread, do not; stop 55, ``page_faults`` below, and
# benchmarks/EXPERIMENTS.md). Plus jemalloc and tcmalloc in place of glibc's malloc
# (``LD_PRELOAD``), where their libraries are installed (Debian: libjemalloc2,
# libtcmalloc-minimal4).
MALLOC_SETTINGS = {
    "default": {},
    "hugetlb": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    "one arena, no mmap": {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "8589934592"},
    "mmap from 1 GiB": {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "8589934592"},
    "no mmap": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "8589934592"},
    "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2"},
    "tcmalloc": {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
}


def _env_without_allocator_settings() -> dict[str, str]:
    """This process's environment without any allocator setting (``MALLOC_*``, ``GLIBC_TUNABLES``,
    ``LD_PRELOAD``), the base each of :data:`MALLOC_SETTINGS` is added to."""
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}


def _malloc_settings() -> dict[str, dict]:
    """:data:`MALLOC_SETTINGS` less the preloads that the dynamic linker cannot load."""
    def found(lib):
        run = subprocess.run([sys.executable, "-c", ""], env=dict(os.environ, LD_PRELOAD=lib), capture_output=True, text=True)
        return "cannot be preloaded" not in run.stderr

    return {k: v for k, v in MALLOC_SETTINGS.items() if "LD_PRELOAD" not in v or found(v["LD_PRELOAD"])}


def malloc(rounds: int = 5, only: tuple[str, ...] | None = None) -> dict:
    """The Jester stack (JAX dense and ``auto``, and the peers if the ``bench`` extra is installed)
    and the three train-step pairs under each of :data:`MALLOC_SETTINGS` (those installed; ``only``:
    these of them), one worker process per setting (glibc reads them at process start), interleaved."""
    from benchmarks import bench, peers

    settings = {k: v for k, v in _malloc_settings().items() if only is None or k in only}
    envs = {label: _env_without_allocator_settings() | extra for label, extra in settings.items()}
    skipped = peers.available()
    med, names = _run_in_workers(envs, "stack" if skipped else "stack+peers", rounds, gap_s=0.1)
    labels = ("dense", "auto") + (() if skipped else peers.PEERS)
    stack = {label: stack_sums({n: med[(label, n)] for n in names}, labels) for label in envs}
    out = {"settings": settings, "rounds": rounds, "gap_s": 0.1, "peers": skipped or peers.versions(),
           "stack_ms": stack,
           "stack_ratios": {k: {f"auto/{p}": d["auto"] / d[p] for p in labels if p != "auto"} for k, d in stack.items()},
           "layer_ms": {f"{label} | {name}": ms for (label, name), ms in med.items()}}
    med, names = _run_in_workers(envs, "steps", rounds + 2, gap_s=0.1)
    refs = {c.name: c.reference for c in bench.model_cases(False) if c.reference}
    out["step_ms"] = {label: {n: med[(label, n)] for n in names} for label in envs}
    out["step_ratios"] = {label: {f"{n} / {ref}": med[(label, n)] / med[(label, ref)] for n, ref in refs.items()}
                          for label in envs}
    out["loadavg"] = os.getloadavg()
    out["machine"] = bench.machine_info()
    return out


MAIN_JOB_STAGES = ("static", "stage1", "stage2", "baseline_resnet18_3d")


def main_job_malloc(rounds: int = 1) -> dict:
    """``train.py``'s default job (the README's first command, in a fresh workdir each time) under
    glibc's defaults and each other installed setting of :data:`MALLOC_SETTINGS` but
    ``hugetlb``, the settings in turn, ``rounds`` times: wall-clock seconds and, per stage, the
    median train steps per second of its metric log (``steps_per_s``, the first record left out)."""
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    settings = {k: v for k, v in _malloc_settings().items() if k != "hugetlb"}
    base = _env_without_allocator_settings()
    runs: dict[str, list] = {label: [] for label in settings}
    for _ in range(rounds):
        for label, extra in settings.items():
            with tempfile.TemporaryDirectory() as workdir:
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "train.py", "--workdir", workdir], cwd=root, env=base | extra,
                               check=True, capture_output=True)
                run = {"wall_s": time.perf_counter() - t0, "steps_per_s": {}}
                for stage in MAIN_JOB_STAGES:
                    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
                        rows = [json.loads(line) for line in f]
                    rates = [r["steps_per_s"] for r in rows if r.get("split") == "train" and "steps_per_s" in r][1:]
                    run["steps_per_s"][stage] = statistics.median(rates)
                runs[label].append(run)
    return {"settings": settings, "rounds": rounds, "runs": runs, "loadavg": os.getloadavg()}


def malloc_no_mmap(rounds: int = 5) -> dict:
    """:func:`malloc` with glibc's defaults, stop 45's "one arena, no mmap" and stop 54's "no mmap"
    (:data:`MALLOC_SETTINGS`)."""
    return malloc(rounds, ("default", "one arena, no mmap", "no mmap"))


PAGE_FAULT_MBS = (16, 40, 60, 70, 100, 400)
_PAGE_FAULTS = """
import json, resource, sys, time
import jax, jax.numpy as jnp
rounds, out = int(sys.argv[1]), {}
for mb in json.loads(sys.argv[2]):
    x = jnp.ones((mb * 2**20 // 256, 64), jnp.float32)
    f = jax.jit(lambda x: x * 2.0 + 1.0)
    f(x).block_until_ready(); f(x).block_until_ready()
    faults, times = [], []
    for _ in range(rounds):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        f(x).block_until_ready()
        times.append((time.perf_counter() - t0) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    out[mb] = {"pages": mb * 256, "minor_faults": sorted(faults)[rounds // 2], "ms": sorted(times)[rounds // 2]}
print(json.dumps(out))
"""


def page_faults(rounds: int = 9) -> dict:
    """Minor page faults and ms of one call of a jitted elementwise op (``x * 2 + 1``, float32)
    whose output is a fresh buffer of each size in :data:`PAGE_FAULT_MBS` MB, medians of ``rounds``
    calls after two warm-up calls, in one process per installed setting of :data:`MALLOC_SETTINGS`
    (in turn, not interleaved: the fault counts, not the times, are the figures). XLA's CPU runtime
    allocates the output on a runtime thread; a buffer whose every page faults on each call was
    mapped afresh for it."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds!r}: expected an int >= 1 (calls timed per buffer size)")
    out = {}
    for label, extra in _malloc_settings().items():
        run = subprocess.run([sys.executable, "-c", _PAGE_FAULTS, str(rounds), json.dumps(PAGE_FAULT_MBS)],
                             env=_env_without_allocator_settings() | extra, capture_output=True, text=True, check=True)
        out[label] = {"env": extra, "by_mb": json.loads(run.stdout.splitlines()[-1])}
    return {"rounds": rounds, "settings": out, "loadavg": os.getloadavg()}


def processes(rounds: int = 25, n: int = 6) -> dict:
    """The ResNet-18 2-D train-step pair of ``bench`` in ``n`` worker processes with the same
    environment, timed in interleaved rounds (:func:`_run_in_workers`): how far the HO-CP/dense
    ratio moves from one process to the next, beyond what interleaving within a process evens out."""
    from benchmarks import bench

    envs = {f"process {i}": dict(os.environ) for i in range(n)}
    med, names = _run_in_workers(envs, "steps2d", rounds, gap_s=0.05)
    (case,) = [c for c in bench.model_cases(False) if c.name in names and c.reference]
    ratios = {label: med[(label, case.name)] / med[(label, case.reference)] for label in envs}
    return {"rounds": rounds, "pair": [case.name, case.reference],
            "ms": {label: {name: med[(label, name)] for name in names} for label in envs},
            "ratio": ratios, "ratio_range": [min(ratios.values()), max(ratios.values())],
            "ratio_median": statistics.median(ratios.values()), "loadavg": os.getloadavg()}
