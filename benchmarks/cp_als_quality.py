"""CP-ALS quality in float32 on exactly low-rank kernels: hocp_jax vs tensorly's parafac.

For each (shape, rank, seed) an exactly rank-R kernel (standard normal factors) is decomposed
at rank R by :func:`hocp_jax.decomposition.decompose` (defaults) and by tensorly's ``parafac``
(numpy backend, float32, SVD init, line search, the same 1000-sweep budget); prints the
relative Frobenius errors and the sweeps hocp_jax ran before its stopping rule fired.

    PYTHONPATH=. python benchmarks/cp_als_quality.py
"""

import numpy as np
import tensorly as tl
from tensorly.decomposition import parafac

from hocp_jax.decomposition import decompose

CASES = [((3, 3, 6, 5), 3), ((3, 3, 16, 16), 8), ((3, 3, 32, 32), 24)]


def main():
    print("| kernel | rank | seed | hocp_jax error | sweeps | tensorly parafac error |")
    print("|---|---|---|---|---|---|")
    for shape, rank in CASES:
        for seed in range(4):
            rng = np.random.default_rng(seed)
            kernel = np.einsum("ar,br,cr,dr->abcd", *[rng.normal(size=(s, rank)) for s in shape]).astype(np.float32)
            sweeps = []
            _, err = decompose(kernel, rank, n_iter=1000, report_every=1000, callback=lambda i, e: sweeps.append(i))
            w, f = parafac(kernel, rank, n_iter_max=1000, init="svd", tol=1e-12, linesearch=True)
            ref = np.linalg.norm(tl.cp_to_tensor((w, f)) - kernel) / np.linalg.norm(kernel)
            print(f"| {shape} | {rank} | {seed} | {err:.1e} | {sweeps[-1]} | {ref:.1e} |", flush=True)


if __name__ == "__main__":
    main()
