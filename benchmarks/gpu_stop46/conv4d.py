"""Is lax's kernel gradient of a 4-D-spatial conv right on the GPU? GPU vs the CPU backend vs ours."""
import jax, jax.numpy as jnp, numpy as np
from hocp_jax import conv, conv_ops, init
from hocp_jax.padding import resolve_padding

cpu = jax.devices("cpu")[0]


def grads(f, *args, device=None):
    def vg(*a):
        y, vjp = jax.vjp(f, *a)
        g = jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))
        return y, vjp(g)
    if device is not None:
        args = jax.device_put(args, device)
        with jax.default_device(device):
            return jax.tree.map(np.asarray, jax.jit(vg)(*args))
    return jax.tree.map(np.asarray, jax.jit(vg)(*args))


def rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


with jax.default_matmul_precision("highest"):
    for sizes, ks, stride, pad in [((3, 4, 4, 5), (3, 3, 2, 3), 1, "SAME"), ((4, 4, 3, 4), (3, 3, 3, 3), 2, 1),
                                   ((4, 6, 6), (3, 3, 3), 2, 1), ((6, 5, 4, 3, 4), (3, 2, 2, 3, 2), 1, "SAME")]:
        n = len(sizes)
        rng = np.random.default_rng(0)
        strides = (stride,) * n
        pads = resolve_padding(pad, sizes, ks, strides, (1,) * n)
        spec = "HWDTU"[:n]
        dn = ("N" + spec + "C", spec + "IO", "N" + spec + "C")
        x = rng.standard_normal((2, *sizes, 4), np.float32)
        kd = rng.standard_normal((*ks, 4, 5), np.float32)
        kg = rng.standard_normal((*ks, 1, 4), np.float32)
        dense = lambda x, k: jax.lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=dn)
        grouped = lambda x, k: jax.lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=dn, feature_group_count=4)
        ours_g = lambda x, k: conv_ops.depthwise_conv(x, k[..., 0, :], stride=stride, padding=pad)
        for name, f, k in [("dense", dense, kd), ("grouped", grouped, kg)]:
            (yg, (dxg, dkg)), (yc, (dxc, dkc)) = grads(f, x, k), grads(f, x, k, device=cpu)
            print(f"{n}-D {name} lax GPU vs CPU: y {rel(yg, yc):.1e} dx {rel(dxg, dxc):.1e} dk {rel(dkg, dkc):.1e}", flush=True)
        (yo, (dxo, dko)) = grads(ours_g, x, kg)
        (yc, (dxc, dkc)) = grads(grouped, x, kg, device=cpu)
        print(f"{n}-D depthwise_conv GPU vs lax CPU: y {rel(yo, yc):.1e} dx {rel(dxo, dxc):.1e} dk {rel(dko, dkc):.1e}", flush=True)
        modes = conv.default_modes(n)
        p = init.init_cp_params(jax.random.key(1), 4, 5, ks, 6, modes=modes)
        for impl in ("reconstructed", "factorized"):
            f = lambda x, p: conv.cp_conv(x, p, modes=modes, stride=stride, padding=pad, implementation=impl)
            (yg, (dxg, dpg)), (yc, (dxc, dpc)) = grads(f, x, p), grads(f, x, p, device=cpu)
            worst = max(rel(dpg[k], dpc[k]) for k in dpc)
            print(f"{n}-D cp_conv {impl} GPU vs CPU: y {rel(yg, yc):.1e} dx {rel(dxg, dxc):.1e} d params (worst) {worst:.1e}",
                  flush=True)
