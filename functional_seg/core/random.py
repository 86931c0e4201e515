"""Explicit, counter-based random keys (JAX-style) on plain integer tensors.

A key is an int64 tensor of shape [2] holding two 32-bit words. Every draw is a pure
function of (key, shape): a keyed integer hash of the element counter 0..n-1, so the same
key gives the same bits on any device, inside ``torch.compile`` and under ``torch.func.vmap``
(a stacked batch of keys has shape [K, 2]). No global RNG is ever touched.

The hash is a three-round xorshift-multiply mixer (after C. Wellons' "hash prospector"
low-bias 32-bit functions); every multiplier is below 2**31 and every operand below 2**32,
so the int64 products never overflow and the arithmetic is exact on CPU and GPU alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "key",
    "split",
    "fold_in",
    "random_bits",
    "uniform",
    "normal",
    "bernoulli",
    "randint",
    "permutation",
    "is_key",
]

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_SPLIT_SALT = 0x5EED1234
_FOLD_SALT = 0x2545F491


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mixer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK
    x = x ^ (x >> 16)
    x = (x * 0x297A2D39) & _MASK
    x = x ^ (x >> 15)
    return x


def is_key(k) -> bool:
    return isinstance(k, torch.Tensor) and k.dtype == torch.int64 and k.shape[-1:] == (2,)


def _check_key(k, fn: str) -> None:
    if k is None:
        raise ValueError(f"{fn} needs a random key (key=...), got None")
    if not is_key(k):
        shape = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
        raise TypeError(f"{fn}: expected a key (int64 tensor of shape [2]), got {shape}")


def key(seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Make a key from an integer seed (any size; hashed to two 32-bit words)."""
    seed = int(seed)
    lo, hi = seed & _MASK, (seed >> 32) & _MASK
    words = torch.tensor([lo, hi ^ _GOLDEN], dtype=torch.int64, device=device)
    return torch.stack([_mix(words[0] ^ _mix(words[1])), _mix(words[1] + 1)])


def random_bits(k: torch.Tensor, shape: Sequence[int] | int, *, _salt: int = 0) -> torch.Tensor:
    """Uniform 32-bit integers in [0, 2**32) as int64, shape ``shape``, on the key's device."""
    _check_key(k, "random_bits")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = math.prod(shape)
    counter = torch.arange(n, dtype=torch.int64, device=k.device)
    k0, k1 = k[..., 0:1], k[..., 1:2]
    x = _mix(counter ^ k0 ^ _salt)
    x = _mix((x + k1) & _MASK)
    x = _mix(x ^ k0)
    return x.reshape((*k.shape[:-1], *shape))  # a tuple: reshape() with no sizes fails for shape ()


def split(k: torch.Tensor, num: int = 2) -> torch.Tensor:
    """``num`` independent keys, shape [num, 2]; unpack with ``a, b = split(key)``."""
    _check_key(k, "split")
    bits = random_bits(k, (num, 2), _salt=_SPLIT_SALT)
    return bits


def fold_in(k: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """A new key that depends on ``k`` and an integer (e.g. the step tensor, no recompiles)."""
    _check_key(k, "fold_in")
    d = torch.as_tensor(data, dtype=torch.int64, device=k.device) & _MASK
    a = _mix(d ^ _FOLD_SALT)
    k0 = _mix(k[..., 0] ^ a)
    k1 = _mix((k[..., 1] + _mix(a ^ k0)) & _MASK)
    return torch.stack([k0, k1], dim=-1)


def uniform(
    k: torch.Tensor,
    shape: Sequence[int] | int = (),
    *,
    low: float | torch.Tensor = 0.0,
    high: float | torch.Tensor = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform floats in [low, high), using as many random bits as ``dtype`` holds exactly (24 in float32)."""
    bits = random_bits(k, shape)
    # mantissa bits + 1: 24 in float32, 11 in float16 (2**24 would overflow it to inf), 32 at most
    nbits = min(round(-math.log2(torch.finfo(dtype).eps)) + 1, 32)
    u = (bits >> (32 - nbits)).to(dtype) * (1.0 / (1 << nbits))
    out = low + (high - low) * u
    # low + (high - low) * u can round up onto high itself: keep the interval half-open (low == high gives low)
    high_t = torch.as_tensor(high, dtype=out.dtype, device=out.device)
    out = torch.minimum(out, torch.nextafter(high_t, torch.full_like(high_t, -math.inf)))
    return torch.maximum(out, torch.as_tensor(low, dtype=out.dtype, device=out.device))


def normal(
    k: torch.Tensor, shape: Sequence[int] | int = (), *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal draws by the Box-Muller transform.

    The underlying bits are identical on every device; the float log and cos may differ between
    CPU and CUDA (or under compile) in the last bit or two.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    bits = random_bits(k, (2, *shape))
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1): log is finite
    u1, u2 = u[..., 0, *([slice(None)] * len(shape))], u[..., 1, *([slice(None)] * len(shape))]
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(dtype)


def bernoulli(
    k: torch.Tensor, p: float | torch.Tensor = 0.5, shape: Sequence[int] | int = ()
) -> torch.Tensor:
    """Boolean draws, True with probability ``p`` (broadcast against ``shape``)."""
    return uniform(k, shape) < p


def randint(k: torch.Tensor, shape: Sequence[int] | int, low: int, high: int) -> torch.Tensor:
    """Integers in [low, high), int64, by multiply-shift (bias below 2**-32 * range)."""
    if not high > low:
        raise ValueError(f"randint: need high > low, got low={low}, high={high}")
    span = high - low
    if span >= 1 << 31:
        raise ValueError(f"randint: range {span} too large (max 2**31 - 1)")
    bits = random_bits(k, shape)
    return low + ((bits * span) >> 32)


def permutation(k: torch.Tensor, n: int) -> torch.Tensor:
    """A random permutation of 0..n-1 (argsort of random bits; ties broken stably)."""
    bits = random_bits(k, (n,))
    return torch.argsort(bits, dim=-1, stable=True)
