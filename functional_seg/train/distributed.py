"""Data parallelism on ``torch.distributed``, the JAX way: one pure step per process, explicit collectives.

Run any ``fseg train`` (or a script calling ``fit``) under ``torchrun``; :func:`world_from_env`
reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and joins the process group (NCCL on CUDA with
device ``cuda:LOCAL_RANK``, gloo on CPU). Without those variables (or with ``WORLD_SIZE=1``) the
``World`` is the single process and every collective below is the identity.

What crosses processes, and where:

- gradients, the averaged model state (batch-norm running statistics) and the step's loss and
  confusion sums: summed INSIDE the pure (compiled) train step with the traceable functional
  collectives of ``torch.distributed._functional_collectives`` (``all_reduce`` on one flat
  bucket per dtype, or one per leaf with ``bucket=False``), after ``grad_and_value``: nothing
  is differentiated through them. DDP is not used (its autograd hooks and ``torch.func`` do not
  mix);
- synchronised batch norm: per-layer statistics [3, C] through :func:`all_reduce_sum_autograd`
  (a ``torch.autograd.Function`` whose backward is the same all-reduce, so ``torch.func.grad``
  differentiates through it; the functional collective's own autograd formula is not
  functorch-ready in torch 2.14);
- the train state: broadcast from rank 0 at the start and after a resume (:func:`broadcast_tree`);
- decisions about the run directory: rank 0 takes them, the others get the outcome or the same
  error (:func:`agree`).

Shapes: a ``World(rank, size, ...)`` splits each global batch of B images into ``size``
contiguous slices of B / size; rank r holds images ``r*B/size .. (r+1)*B/size - 1``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.tree import tree_map

__all__ = ["World", "SINGLE", "world_from_env", "all_reduce_sum", "all_reduce_sum_autograd",
           "broadcast_tree", "agree", "failure_report", "shutdown"]


@dataclass(frozen=True)
class World:
    """Where this process stands in the job (static: bound into the step before compiling).

    Attributes:
        rank, size, local_rank: from torchrun's environment (0, 1, 0 for a single process).
        bucket: reduce all leaves of one dtype as one flat tensor (one collective) rather than
            one collective per leaf.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    bucket: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def local_batch(self, batch_size: int) -> int:
        """B / size, the images each rank holds per step; a clear error when it does not divide."""
        if batch_size % self.size:
            raise ValueError(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                             f"world size {self.size} (each of the {self.size} processes takes an equal slice)")
        return batch_size // self.size

    def device(self, device: str | torch.device) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` when asked for CUDA, else ``device``."""
        device = torch.device(device)
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device


SINGLE = World()


def world_from_env(device: str | torch.device = "cpu", *, bucket: bool = True) -> World:
    """The ``World`` of this process; joins the process group on first use (idempotent).

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (set by ``torchrun``) and the rendezvous
    ``MASTER_ADDR``/``MASTER_PORT``. The backend is NCCL for a CUDA device, gloo otherwise;
    ``FSEG_DIST_TIMEOUT`` (seconds, default 600) bounds how long a collective waits for a peer.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(bucket=bucket)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local)
        timeout = datetime.timedelta(seconds=float(os.environ.get("FSEG_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        atexit.register(_leave_at_exit)
    if dist.get_world_size() != size or dist.get_rank() != rank:
        raise RuntimeError(f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees "
                           f"with RANK={rank} WORLD_SIZE={size}")
    return World(rank=rank, size=size, local_rank=local, bucket=bucket)


def shutdown() -> None:
    """Leave the process group (at the end of a run, so the next one may join another)."""
    if dist.is_initialized():
        dist.destroy_process_group()


# Set by failure_report: this rank is ending on an error, so its peers may be inside a collective.
_FAILED = False


def _leave_at_exit() -> None:
    """Registered when this process joins: leave the group while the interpreter is still whole.

    A process that exits holding a gloo group can die with SIGABRT during interpreter shutdown
    (gloo's worker threads still hold work objects whose tensors need the GIL; pytorch/pytorch
    PR 179291), which turned finished runs into failed ones (seen: rank 1 of a 2-rank CPU run,
    exit -6 after its last epoch). After a failure the group is left alone: destroying it may
    wait on peers that are blocked in a collective, and torchrun ends the job anyway.
    """
    if not _FAILED:
        shutdown()


# ----------------------------------------------------------------------------------------------
# Collectives inside the step (traceable by dynamo; none are differentiated but the autograd one)


def _group_name() -> str:
    return dist.group.WORLD.group_name


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed import _functional_collectives as fc

    return fc.wait_tensor(torch.ops._c10d_functional.all_reduce(t.contiguous(), "sum", _group_name()))


def all_reduce_sum(world: World, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over the ranks, out of place (the identity in a single process).

    With ``world.bucket`` the tensors of each dtype travel as one flat buffer (one collective per
    dtype), otherwise one collective each. Traceable: ``torch.compile`` keeps it in the graph.
    """
    tensors = list(tensors)
    if not world.distributed:
        return tensors
    if not world.bucket:
        return [_all_reduce(t) for t in tensors]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = _all_reduce(torch.cat([tensors[i].reshape(-1) for i in idx]))
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = part.view(tensors[i].shape)
    return out


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x; dL/dx = sum over ranks of dL/dy (the loss is the sum of the ranks')."""

    @staticmethod
    def forward(x):
        return _all_reduce(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad)

    @staticmethod
    def vmap(info, in_dims, x):
        # elementwise over ranks: reduce the whole stacked tensor at once (one collective, not K)
        return _AllReduceSum.apply(x), in_dims[0]


def all_reduce_sum_autograd(x: torch.Tensor) -> torch.Tensor:
    """A differentiable all-reduce sum (for synchronised batch norm's statistics)."""
    return _AllReduceSum.apply(x)


# ----------------------------------------------------------------------------------------------
# Outside the step: broadcasting the state, agreeing on decisions, failing together


def broadcast_tree(world: World, tree):
    """Rank 0's tree on every rank (fresh tensors; the input is not written)."""
    if not world.distributed:
        return tree

    def bcast(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach().clone().contiguous()
        dist.broadcast(t, src=0)
        return t

    return tree_map(bcast, tree)


def agree(world: World, fn: Callable, errors: Sequence[type[BaseException]] = ()):
    """Run ``fn`` on rank 0 and hand its result, or its error, to every rank.

    An exception of a class in ``errors`` is raised on the other ranks too, with the same message
    (a refused run directory ends every process in one clear line); any other one ends them with
    a RuntimeError naming it.
    """
    if not world.distributed:
        return fn()
    box: list = [None]
    failure = None
    if world.is_main:
        try:
            box[0] = ("ok", fn())
        except BaseException as err:  # handed to the others, then re-raised here
            failure = err
            box[0] = ("err", type(err).__name__, str(err))
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0][0] == "ok":
        return box[0][1]
    _, name, message = box[0]
    for cls in errors:
        if cls.__name__ == name:
            raise cls(message)
    raise RuntimeError(f"rank 0 failed ({name}: {message})")


@contextlib.contextmanager
def failure_report(world: World):
    """On an error, print one line naming the rank before it propagates (torchrun then ends the job)."""
    try:
        yield
    except BaseException as err:
        global _FAILED
        _FAILED = True
        if world.distributed and not isinstance(err, KeyboardInterrupt):
            print(f"fseg: rank {world.rank} of {world.size} failed: {type(err).__name__}: "
                  f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}; the job ends and no "
                  "checkpoint is written after this point", file=sys.stderr, flush=True)
        raise

