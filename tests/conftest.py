"""Shared fixtures: random keys, a local torch generator for test data, and the hypothesis profile.

The "ci" profile is derandomized so every run draws the same examples; set
HYPOTHESIS_PROFILE=dev for a wider, randomized search.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import settings

from functional_seg.core import random as jr

# Under pytest-xdist (``make test`` runs ``-n 2``) each worker owns one core: one torch thread per
# worker, and the same for the processes the tests start (CLI runs, torchrun ranks), so two
# workers never fight over two cores with four threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

settings.register_profile("ci", deadline=None, max_examples=30, derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _user_cache_in_a_temp_dir(tmp_path_factory):
    """Prepared-data and compile caches go to the user cache directory: keep the suite's out of ~/.cache."""
    if "FSEG_TEST_KEEP_CACHE" not in os.environ:
        os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))
    yield


@pytest.fixture
def key() -> torch.Tensor:
    """The key every test starts from: ``functional_seg.core.random.key(0)``."""
    return jr.key(0)


@pytest.fixture
def rng_key():
    """A factory of keys: ``rng_key()`` -> key(0), ``rng_key(seed)`` -> key(seed)."""

    def make(seed: int = 0) -> torch.Tensor:
        return jr.key(seed)

    return make


@pytest.fixture
def gen() -> torch.Generator:
    """A local, seeded CPU generator for test inputs, so tests never use or disturb torch's global RNG."""
    return torch.Generator().manual_seed(0)


@contextlib.contextmanager
def global_rng_unchanged():
    """Assert that the block leaves torch's global CPU (and, if present, CUDA) RNG state as it found it."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    yield
    assert torch.equal(torch.get_rng_state(), cpu), "global CPU RNG state changed"
    if cuda:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda)), "CUDA RNG changed"


@pytest.fixture
def no_global_rng():
    """The :func:`global_rng_unchanged` context manager, as a fixture."""
    return global_rng_unchanged
