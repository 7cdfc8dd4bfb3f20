"""Padding, stride and dilation arguments: validation and resolution to explicit pads.

Every convolution in hocp-jax resolves its padding to explicit ``(lo, hi)`` pairs per
spatial mode *before* calling XLA, so that the factorized path (one 1-D conv per mode)
and the dense path (one N-D conv) pad identically.

Accepted ``padding`` values (``N`` = number of spatial modes, ``k`` kernel size,
``d`` dilation, ``s`` stride, ``D`` input size):

* ``"VALID"``: no padding.
* ``"SAME"``: lax/TensorFlow semantics. Output size ``ceil(D / s)``; the total pad
  ``max((ceil(D/s) - 1) * s + d*(k-1) + 1 - D, 0)`` is split with the extra element at
  the end. At stride 2 on an even size with k=3 this is ``(0, 1)``.
* ``"SYMMETRIC"``: PyTorch's conventional ``padding=d*(k-1)//2`` on both sides. At stride 2
  on an even size with k=3 this is ``(1, 1)``: as many output rows as lax's ``(0, 1)``, shifted
  by one input pixel. On an odd size both give ``(1, 1)``.
* an ``int`` ``p``: PyTorch-style symmetric ``(p, p)`` on every mode.
* a sequence of length N whose entries are any of the above per mode, or ``(lo, hi)``
  pairs (lax-style explicit padding), e.g. ``((0, 1), (1, 1))`` or ``(1, "VALID")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

from jax import lax

from hocp_jax.checks import is_int

Pad = tuple[int, int]
PaddingLike = Union[str, int, Sequence[Union[str, int, Sequence[int]]]]

_NAMED = ("VALID", "SAME", "SYMMETRIC")


def as_tuple(value, n: int, name: str) -> tuple[int, ...]:
    """Broadcasts an int (or a length-``n`` sequence of ints) to a tuple of ``n`` ints >= 1."""
    if is_int(value):
        out = (int(value),) * n
    elif isinstance(value, Sequence) and len(value) == n and all(is_int(v) for v in value):
        out = tuple(int(v) for v in value)
    else:
        raise ValueError(f"{name}={value!r}: expected an int or a sequence of {n} ints (one per spatial mode)")
    if any(v < 1 for v in out):
        raise ValueError(f"{name}={value!r}: every entry must be >= 1")
    return out


def check_mode_padding(spec, name: str = "padding") -> None:
    """A ValueError naming ``name`` unless ``spec`` is one mode's padding: one of ``_NAMED`` (any
    case), an int >= 0 or a ``(lo, hi)`` pair of ints >= 0."""
    if isinstance(spec, str):
        if spec.upper() not in _NAMED:
            raise ValueError(f"{name}={spec!r}: unknown padding, expected one of {_NAMED}, an int or (lo, hi)")
    elif is_int(spec):
        if spec < 0:
            raise ValueError(f"{name}={spec!r}: must be >= 0")
    elif isinstance(spec, Sequence) and len(spec) == 2 and all(is_int(v) for v in spec):
        if min(spec) < 0:
            raise ValueError(f"{name}={tuple(spec)!r}: pads must be >= 0")
    else:
        raise ValueError(f"{name}={spec!r}: expected one of {_NAMED}, an int or a (lo, hi) pair")


def _resolve_one(spec, size: int, k: int, s: int, d: int, where: str, symbolic_same: bool) -> Pad:
    check_mode_padding(spec, f"padding{where}")
    if isinstance(spec, str):
        name = spec.upper()
        if name == "VALID":
            return (0, 0)
        if name == "SAME":
            if not is_int(size) and s > 1:
                if symbolic_same:
                    return lax.padtype_to_pads((size,), (d * (k - 1) + 1,), (s,), "SAME")[0]
                raise ValueError(f"padding{where}='SAME' with stride {s} on a symbolic size {size} (jax.export): the "
                                 "pads depend on the size; expected a static size, or 'SYMMETRIC' / explicit pads")
            out = -(-size // s)
            total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
            return (total // 2, total - total // 2)
        p = d * (k - 1) // 2  # SYMMETRIC
        return (p, p)
    if is_int(spec):
        return (int(spec), int(spec))
    return (int(spec[0]), int(spec[1]))


def resolve_padding(
    padding: PaddingLike,
    in_sizes: Sequence[int],
    kernel_sizes: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    *,
    symbolic_same: bool = False,
) -> tuple[Pad, ...]:
    """Resolves ``padding`` to one explicit ``(lo, hi)`` pair per spatial mode.

    Args:
      padding: see the module docstring.
      in_sizes, kernel_sizes, strides, dilations: length-N sequences (N spatial modes).
      symbolic_same: for ``"SAME"`` on a strided mode of symbolic size (``jax.export``'s shape
        polymorphism), return ``lax``'s pads, which depend on the size (symbolic expressions,
        which only :func:`hocp_jax.conv_ops.depthwise_conv_1d` takes: a CP conv with Psi), instead
        of raising.

    Returns:
      A tuple of N ``(lo, hi)`` int pairs (symbolic ones only as ``symbolic_same`` says).

    Raises:
      ValueError: bad ``padding``, an input smaller than the padded kernel, or ``"SAME"`` on a
        strided mode of symbolic size without ``symbolic_same`` (the library's dense, depthwise,
        Tucker, TT and CP convs without Psi pad such an input before:
        :func:`hocp_jax.conv_ops.same_on_symbolic`). Other pads do not depend on the size: a
        symbolic size passes unchecked against the kernel.
    """
    n = len(in_sizes)
    if isinstance(padding, str) or is_int(padding):
        specs = [padding] * n
    elif isinstance(padding, Sequence) and len(padding) == n:
        specs = list(padding)
    else:
        raise ValueError(
            f"padding={padding!r}: expected one of {_NAMED}, an int, or a sequence of {n} per-mode "
            "entries (str, int or (lo, hi))"
        )
    pads = tuple(
        _resolve_one(spec, D, k, s, d, f"[{i}]" if len(specs) > 1 and not (isinstance(padding, str) or is_int(padding)) else "",
                     symbolic_same)
        for i, (spec, D, k, s, d) in enumerate(zip(specs, in_sizes, kernel_sizes, strides, dilations))
    )
    for i, ((lo, hi), D, k, d) in enumerate(zip(pads, in_sizes, kernel_sizes, dilations)):
        if is_int(D) and D + lo + hi < d * (k - 1) + 1:
            raise ValueError(
                f"padding: spatial mode {i} has size {D} + pads {(lo, hi)} smaller than the dilated kernel "
                f"extent {d * (k - 1) + 1}; expected a larger input or more padding"
            )
    return pads


def output_size(size: int, k: int, s: int, d: int, pad: Pad) -> int:
    """Output length of a 1-D conv: ``floor((size + lo + hi - d*(k-1) - 1) / s) + 1``."""
    return (size + pad[0] + pad[1] - d * (k - 1) - 1) // s + 1
