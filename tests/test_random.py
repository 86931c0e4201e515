"""Laws of the explicit random keys: determinism, independence, ranges, vmap, compile, devices, no global RNG."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import global_rng_unchanged
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import keys, seeds

from functional_seg.core import random as jr

DRAWS = {
    "random_bits": lambda k: jr.random_bits(k, (3, 5)),
    "uniform": lambda k: jr.uniform(k, (3, 5), low=-2.0, high=3.0),
    "normal": lambda k: jr.normal(k, (3, 5)),
    "bernoulli": lambda k: jr.bernoulli(k, 0.3, (3, 5)),
    "randint": lambda k: jr.randint(k, (3, 5), -4, 9),
    "permutation": lambda k: jr.permutation(k, 15),
    "split": lambda k: jr.split(k, 4),
    "fold_in": lambda k: jr.fold_in(k, 7),
}


# ---------------------------------------------------------------------------------------------- keys


def test_key_is_two_32_bit_words():
    k = jr.key(0)
    assert k.dtype == torch.int64 and k.shape == (2,)
    assert jr.is_key(k) and not jr.is_key(torch.zeros(2)) and not jr.is_key(torch.zeros(3, dtype=torch.int64))
    assert ((k >= 0) & (k < 2**32)).all()


@given(seeds)
def test_same_seed_same_key_and_bits(seed):
    a, b = jr.key(seed), jr.key(seed)
    assert torch.equal(a, b)
    assert torch.equal(jr.random_bits(a, 64), jr.random_bits(b, 64))
    assert torch.equal(jr.random_bits(a, 64), jr.random_bits(a.clone(), 64))


@given(keys)
def test_every_draw_is_a_pure_function_of_the_key(k):
    for name, draw in DRAWS.items():
        first = draw(k)
        assert torch.equal(first, draw(k)), name
        assert torch.equal(first, draw(k.clone())), name


def test_a_draw_does_not_depend_on_the_shape_of_other_draws(key):
    # counter-based: element i of a draw is the same whatever else was drawn before it
    assert torch.equal(jr.random_bits(key, 10), jr.random_bits(key, 100)[:10])
    assert torch.equal(jr.random_bits(key, (4, 5)).flatten(), jr.random_bits(key, 20))


def test_missing_or_wrong_keys_raise():
    with pytest.raises(ValueError, match="key"):
        jr.uniform(None, (2,))
    with pytest.raises(TypeError, match="key"):
        jr.split(torch.zeros(2))
    with pytest.raises(TypeError, match="key"):
        jr.fold_in(0, 1)
    with pytest.raises(ValueError):
        jr.randint(jr.key(0), (2,), 3, 3)


# ------------------------------------------------------------------------------------ independence


@given(keys, st.integers(2, 64))
def test_split_keys_are_pairwise_distinct_and_differ_from_the_parent(k, n):
    subkeys = jr.split(k, n)
    assert subkeys.shape == (n, 2) and all(jr.is_key(s) for s in subkeys)
    rows = {tuple(s.tolist()) for s in subkeys} | {tuple(k.tolist())}
    assert len(rows) == n + 1
    draws = {tuple(jr.random_bits(s, 4).tolist()) for s in subkeys}
    assert len(draws) == n


@given(keys)
def test_split_of_a_split_key_is_new(k):
    a, b = jr.split(k)
    aa, ab = jr.split(a)
    seen = {tuple(x.tolist()) for x in (k, a, b, aa, ab)}
    assert len(seen) == 5


@given(seeds, seeds)
def test_draws_from_different_keys_differ(s1, s2):
    assume(s1 != s2)
    k1, k2 = jr.key(s1), jr.key(s2)
    assert not torch.equal(k1, k2)
    assert not torch.equal(jr.random_bits(k1, 8), jr.random_bits(k2, 8))
    assert not torch.equal(jr.uniform(k1, 8), jr.uniform(k2, 8))


def test_fold_in_distinct_for_distinct_data(key):
    folded = torch.stack([jr.fold_in(key, i) for i in range(1000)])
    assert len({tuple(r.tolist()) for r in folded}) == 1000
    assert not (folded == key).all(dim=1).any()
    # data beyond 32 bits folds mod 2**32 (documented), negative data is fine
    assert len({tuple(jr.fold_in(key, i).tolist()) for i in (-1, -2, 2**31, 2**32 - 3)}) == 4


@given(keys, st.integers(-(2**31), 2**31 - 1))
def test_fold_in_takes_int_or_tensor(k, i):
    expected = jr.fold_in(k, i)
    assert torch.equal(jr.fold_in(k, torch.tensor(i)), expected)
    assert torch.equal(jr.fold_in(k, torch.tensor(i, dtype=torch.int32)), expected)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()


def test_related_keys_give_uncorrelated_draws(key):
    n = 100_000
    a, b = jr.split(key)
    pairs = [(a, b), (key, a), (jr.key(0), jr.key(1)), (jr.fold_in(key, 0), jr.fold_in(key, 1))]
    for k1, k2 in pairs:
        assert abs(_corr(jr.uniform(k1, n), jr.uniform(k2, n))) < 0.02  # ~6 sigma at n=1e5
    u = jr.uniform(key, n + 1)
    assert abs(_corr(u[:-1], u[1:])) < 0.02  # neighbouring counters


# ------------------------------------------------------------------------------------------ ranges


@given(keys, st.floats(-1e3, 1e3), st.floats(1e-3, 1e3))
def test_uniform_in_half_open_range(k, low, width):
    high = low + width
    u = jr.uniform(k, (1000,), low=low, high=high)
    assert u.dtype == torch.float32
    assert (u >= low).all() and (u < high).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_uniform_extreme_bits_stay_in_range(monkeypatch, dtype):
    """The largest possible bits must not round up onto high (nor overflow float16 to inf)."""
    for fill in (0, 2**32 - 1):
        monkeypatch.setattr(jr, "random_bits", lambda k, shape, fill=fill, **kw: torch.full(shape, fill))
        for low, high in [(0.0, 1.0), (1.0, 2.0), (-0.125, 0.125), (3.0, 3.0)]:
            u = jr.uniform(jr.key(0), (4,), low=low, high=high, dtype=dtype)
            assert u.dtype == dtype and torch.isfinite(u).all()
            assert (u >= low).all()
            assert (u < high).all() if high > low else (u == low).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_uniform_low_precision_dtypes(key, dtype):
    u = jr.uniform(key, (10_000,), dtype=dtype)
    assert u.dtype == dtype and torch.isfinite(u).all()
    assert (u >= 0).all() and (u < 1).all()
    assert abs(u.double().mean().item() - 0.5) < 0.02


def test_uniform_tensor_bounds_broadcast(key):
    low, high = torch.tensor([0.0, 10.0]), torch.tensor([1.0, 20.0])
    u = jr.uniform(key, (1000, 2), low=low, high=high)
    assert ((u >= low) & (u < high)).all()


@given(keys, st.integers(-1000, 1000), st.integers(1, 2**31 - 1))
def test_randint_in_range(k, low, span):
    r = jr.randint(k, (500,), low, low + span)
    assert r.dtype == torch.int64
    assert (r >= low).all() and (r < low + span).all()


def test_randint_roughly_uniform(key):
    bins, n = 10, 100_000
    counts = torch.bincount(jr.randint(key, (n,), 0, bins), minlength=bins).double()
    expected = n / bins
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 40.0  # 9 dof: P(chi2 > 40) < 1e-5
    assert set(jr.randint(key, (1000,), 5, 7).unique().tolist()) == {5, 6}


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_bernoulli_mean(key, p):
    n = 100_000
    b = jr.bernoulli(key, p, (n,))
    assert b.dtype == torch.bool
    tol = 5 * (max(p * (1 - p), 1e-12) / n) ** 0.5 + 1e-9
    assert abs(b.double().mean().item() - p) <= tol


def test_bernoulli_tensor_p_broadcasts(key):
    p = torch.tensor([0.0, 1.0, 0.5])
    b = jr.bernoulli(key, p, (1000, 3))
    assert not b[:, 0].any() and b[:, 1].all() and 0.4 < b[:, 2].double().mean() < 0.6


def test_normal_moments(key):
    z = jr.normal(key, (100_000,)).double()
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.02
    assert abs(z.std().item() - 1.0) < 0.02
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.01
    assert jr.normal(key, (2, 3), dtype=torch.float64).dtype == torch.float64


@given(keys, st.integers(1, 200))
def test_permutation_is_a_permutation(k, n):
    perm = jr.permutation(k, n)
    assert perm.dtype == torch.int64
    assert torch.equal(perm.sort().values, torch.arange(n))


def test_permutation_mixes(key):
    perms = {tuple(jr.permutation(k, 6).tolist()) for k in jr.split(key, 200)}
    assert len(perms) > 150  # 720 possible


def test_draw_shapes(key):
    assert jr.uniform(key).shape == () and jr.normal(key).shape == () and jr.bernoulli(key).shape == ()
    assert jr.uniform(jr.split(key, 3)).shape == (3,)  # a stack of keys draws one sample per key
    assert jr.normal(jr.split(key, 3), (2,)).shape == (3, 2)
    assert jr.normal(key, 5).shape == (5,)
    assert jr.bernoulli(key, 0.5, (2, 3)).shape == (2, 3)
    assert jr.randint(key, (0,), 0, 2).shape == (0,)


# --------------------------------------------------------------------------- vmap, compile, devices


@pytest.mark.parametrize("name", list(DRAWS))
def test_vmap_over_stacked_keys_equals_loop(key, name):
    draw = DRAWS[name]
    stacked = jr.split(key, 5)
    expected = torch.stack([draw(k) for k in stacked])
    assert torch.equal(torch.func.vmap(draw)(stacked), expected)


def test_vmap_fold_in_over_steps_equals_loop(key):
    steps = torch.arange(6)
    expected = torch.stack([jr.fold_in(key, int(s)) for s in steps])
    assert torch.equal(torch.func.vmap(lambda s: jr.fold_in(key, s))(steps), expected)


class CountingBackend:
    """A torch.compile backend that counts compilations and runs the captured graph eagerly."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


def test_compile_fold_in_step_tensor_matches_eager_without_recompiles(key):
    def draw(k, step):
        step_key = jr.fold_in(k, step)
        noise_key, drop_key = jr.split(step_key)
        return jr.normal(noise_key, (4, 3)) + jr.uniform(drop_key, (4, 3), low=-1.0, high=1.0), jr.randint(
            step_key, (5,), 0, 10)

    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(draw, backend=backend, fullgraph=True)
    for step in [0, 1, 7, 123, 2**31 - 1]:
        s = torch.tensor(step)
        for got, want in zip(compiled(key, s), draw(key, s)):
            assert torch.equal(got, want)
    assert backend.compiles == 1
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(DRAWS))
def test_same_bits_on_cuda_and_cpu(name):
    """Integer arithmetic is exact everywhere; normal's log and cos may differ in the last bits between devices."""
    draw = DRAWS[name]
    for seed in (0, 1, 2**40 + 3):
        cpu = draw(jr.key(seed))
        cuda = draw(jr.key(seed, device="cuda"))
        assert cuda.device.type == "cuda"
        if name == "normal":
            torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(cuda.cpu(), cpu), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inductor_on_cuda_matches_eager_cpu():
    def draw(k, step):
        k = jr.fold_in(k, step)
        return jr.random_bits(k, (64,)), jr.uniform(k, (64,)), jr.normal(k, (64,))

    compiled = torch.compile(draw, fullgraph=True)
    for step in range(3):
        got = compiled(jr.key(0, device="cuda"), torch.tensor(step, device="cuda"))
        want = draw(jr.key(0), torch.tensor(step))
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
        torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-6, atol=1e-6)  # log/cos may differ by an ulp


# ------------------------------------------------------------------------------------ no global RNG


def test_draws_never_touch_the_global_rng(key):
    with global_rng_unchanged():
        for draw in DRAWS.values():
            draw(key)
        torch.func.vmap(DRAWS["normal"])(jr.split(key, 3))


def test_key_construction_never_touches_the_global_rng():
    with global_rng_unchanged():
        for seed in itertools.chain(range(5), [2**62]):
            jr.split(jr.fold_in(jr.key(seed), seed), 3)
