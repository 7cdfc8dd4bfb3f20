"""Shared pytest setup: float32 CPU JAX, deterministic keys, scripts on simulated devices."""
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile far more than they run, and LLVM's optimisation of XLA's CPU code is most of
# a compile. Level 0 changes only the machine code made from the same optimised HLO
# (tests/test_xla_level.py compares the compiled HLO at both levels), though that code can round
# differently (one slow test runs at the default level for it: test_models.py, explicit sharding);
# the suite ran 1.6x faster (README, "Two commands"). The benchmarks and train.py keep XLA's
# default. Test subprocesses inherit it (those that set a device count append to XLA_FLAGS).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# The suite compiles many programs more than once: train.py run again on a finished workdir (the
# resume tests) evaluates the same models, tests build the same tiny models in new closures. JAX's
# persistent compilation cache, in a folder of this test session (never a user's), compiles each
# once; test subprocesses inherit it. Every program is cached, not only those that compile in a
# second or more (JAX's default threshold): most of the suite's programs are small and compiled
# again by later tests and processes (stop 67: 143 tests of four files in two workers took 0.83x
# the time with every program cached: benchmarks/EXPERIMENTS.md, "Test-suite time").
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hocp-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

# The files whose tests take longest in all, longest first (seconds of one worker in the default
# suite, stop 78, 2-core AMD EPYC VM: 194, 168, 136, 128, 105, 101, 100, 92, 91, 86, 84, 71).
# The README's command gives each of its two workers one file at a time; pytest-xdist's default
# order (by number of tests per file) leaves the few long end-to-end tests' files for last, where
# one worker can finish them while the other idles. With the longest files first the suite took
# 0.97x the time in one pair of runs (benchmarks/EXPERIMENTS.md, "Test-suite time"). Only the
# order of files changes, never of the tests within one; a stale list costs time, not results.
LONGEST_FILES = ("test_train_program.py", "test_models.py", "test_training.py", "test_conv.py", "test_trained.py",
                 "test_perf_paths.py", "test_shard_map.py", "test_init_from.py", "test_pooling.py", "test_dtype.py",
                 "test_colabs.py", "test_export.py")


def pytest_collection_modifyitems(items):
    """Longest files first (:data:`LONGEST_FILES`), then the others in collection order; with
    ``--no-loadscope-reorder`` (``pyproject.toml``'s ``addopts``) pytest-xdist hands files out in
    this order."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def run_on_devices():
    """``run(script, n_devices, *args, xla_flags=None)``: runs the Python source ``script`` with
    ``args`` in a process of its own on ``n_devices`` simulated CPU devices (XLA fixes the device
    count at start-up) and returns the JSON its last output line prints; its stderr on failure.
    ``xla_flags``: the process's other ``XLA_FLAGS`` (default: this process's)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(script: str, n_devices: int, *args: str, xla_flags: str | None = None):
        flags = os.environ["XLA_FLAGS"] if xla_flags is None else xla_flags
        env = os.environ | {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n_devices}",
                            "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
        out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    return run


@pytest.fixture
def run_processes():
    """``run(argv_of, n=2, timeout=300)``: starts ``n`` processes at once, process ``i`` running
    ``[python, *argv_of(port, i)]`` with ``port`` a free local port (for a ``jax.distributed``
    coordinator on 127.0.0.1), and returns their ``CompletedProcess`` (text output) once all ended."""
    def run(argv_of, n: int = 2, timeout: float = 300):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, *argv_of(port, i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for i in range(n)]
        outputs = [proc.communicate(timeout=timeout) for proc in procs]
        return [subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
                for proc, (out, err) in zip(procs, outputs)]

    return run


@pytest.fixture
def load_config():
    """``load(module, arg="")``: ``get_config(arg)`` of ``configs/<module>.py`` (the configs folder
    is the repository's, not an installed package)."""
    import importlib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def load(module: str, arg: str = ""):
        sys.path.insert(0, root)
        try:
            return importlib.import_module(f"configs.{module}").get_config(*([arg] if arg else []))
        finally:
            sys.path.remove(root)

    return load


@pytest.fixture
def assert_tangents_match_central_differences():
    """``check(model, x, rng)``: asserts that ``jax.jvp`` of ``model``'s inference outputs w.r.t.
    all its parameters equals a central difference, in float64, at parameters moved off their
    initial values (whose zero biases and shifts put ReLUs exactly at their kinks) along a random
    tangent drawn from ``rng``; returns the tangents (a list of the output leaves')."""
    import jax.numpy as jnp
    import numpy as np

    def check(model, x, rng):
        with jax.enable_x64(True):
            x = jnp.asarray(x, jnp.float64)
            variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), model.init(jax.random.key(0), x, train=False))
            params = jax.tree.map(lambda v: v + 0.1 * rng.standard_normal(v.shape), variables["params"])
            t = jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(v.shape)), params)

            @jax.jit
            def f(params):
                return jax.tree.leaves(model.apply({**variables, "params": params}, x, train=False))

            _, got = jax.jvp(f, (params,), (t,))
            eps = 1e-8  # small: the nets have ~10^5 ReLU inputs, a larger step moves some across their kink
            step = lambda s: f(jax.tree.map(lambda p, d: p + s * eps * d, params, t))
            for a, plus, minus in zip(got, step(1.0), step(-1.0)):
                np.testing.assert_allclose(a, (plus - minus) / (2 * eps), rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))
        return got

    return check
