"""Compiles one of bench's train steps (argv[1] = case name; argv[2] = 'patches' for its patches program)."""
import sys, time
from benchmarks import bench, patches

case = next(c for c in bench.model_cases(False) if c.name == sys.argv[1])
t0 = time.perf_counter()
if len(sys.argv) > 2:
    with patches.patches_convs():
        bench.prepare_model_case(case)
else:
    bench.prepare_model_case(case)
print(f"compiled {sys.argv[1:]} in {time.perf_counter() - t0:.1f} s", flush=True)
