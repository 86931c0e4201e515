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

Joining: a process that waits for the rendezvous (``MASTER_ADDR:MASTER_PORT``) longer than a few
seconds says so on stderr (its rank, the address, and how long it will wait:
``FSEG_DIST_TIMEOUT``), and one that cannot join in that time ends with one
:class:`RendezvousError` line naming the address, not torch's traceback.

World-size invariance, and its true bound: the global batch, its order, every augmentation and
(with ``sync_bn``) every batch statistic are the same for any number of processes; what changes
is float summation order (conv weight gradients summed over B images or over slices of B/size,
batch-norm moments from a two-pass kernel in one process or summed across ranks). Those
rounding differences (~1e-7) stay ~1e-7 in small models (tested: <= 1e-4 after 2 epochs), but
max-pool switches and ReLUs near 0 can amplify them, and Adam normalises each gradient element,
so an element whose gradient is within rounding of 0 takes a step of about +lr in one run and
-lr in the other: up to ~2 lr per step apart. Measured with the default SegNet at 32 px, batch
8, lr 1e-2 under ``--sync-bn``: 1 vs 2 processes differ by 0.020 (= 2 lr) after ONE step, and one
process with the two batch-norm formulas differs the same way; resuming 2 -> 1 process 6e-3
after 6 steps (the fault report's 2.6e-3 is ~2.6 lr at lr 1e-3). Resume itself is exact on the
same world size. Models whose apply draws from its key (dropout, drop-path: segformer, vit)
are NOT world-size invariant: each process draws its slice's masks from ``fold_in(key, rank)``,
so a 2-process run equals ``accumulate=2`` instead (measured: segformer 0.078 apart after 4 steps).

Shapes: a ``World(rank, size, ...)`` splits each global batch of B images into ``size``
contiguous slices of B / size; rank r holds images ``r*B/size .. (r+1)*B/size - 1``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.tree import tree_map

__all__ = ["World", "SINGLE", "world_from_env", "all_reduce_sum", "all_reduce_sum_autograd",
           "broadcast_tree", "agree", "failure_report", "shutdown", "RendezvousError", "join"]

# A process still waiting for its peers after this many seconds (or half its timeout) says so.
NOTICE_AFTER_S = 5.0


class RendezvousError(ValueError):
    """This process could not join the job (address unreachable, peers absent, bad variables)."""


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
        join("nccl" if cuda else "gloo", rank, size)
        atexit.register(_leave_at_exit)
    if dist.get_world_size() != size or dist.get_rank() != rank:
        raise RuntimeError(f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees "
                           f"with RANK={rank} WORLD_SIZE={size}")
    return World(rank=rank, size=size, local_rank=local, bucket=bucket)


def _timeout_s() -> float:
    text = os.environ.get("FSEG_DIST_TIMEOUT", "600")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise RendezvousError(f"FSEG_DIST_TIMEOUT must be a positive number of seconds, got {text!r}")
    return value


def join(backend: str, rank: int, size: int) -> None:
    """``init_process_group`` (env:// rendezvous), saying what it waits for and failing in one line.

    A notice goes to stderr after ``min(NOTICE_AFTER_S, timeout / 2)`` seconds still waiting:
    rank, ``MASTER_ADDR:MASTER_PORT`` and the timeout (``FSEG_DIST_TIMEOUT``, default 600 s).

    Raises:
        RendezvousError: the variables are missing, or joining failed or timed out (torch's
            DistNetworkError / DistStoreError), naming the address, the rank and what to check.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    who = f"rank {rank} of {size}"
    if not addr or not port:
        raise RendezvousError(f"{who}: MASTER_ADDR and MASTER_PORT must name the rendezvous (torchrun sets them), "
                              f"got MASTER_ADDR={addr!r} MASTER_PORT={port!r}")
    timeout = _timeout_s()
    where = f"{addr}:{port}"
    text = (f"fseg: {who} is waiting for the job's other processes at {where} (MASTER_ADDR:MASTER_PORT); it gives "
            f"up after {timeout:g} s (FSEG_DIST_TIMEOUT)\n")
    with _native_log_held() as stderr_fd:
        notice = threading.Timer(min(NOTICE_AFTER_S, timeout / 2), lambda: os.write(stderr_fd, text.encode()))
        notice.daemon = True
        notice.start()
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, TimeoutError, ValueError) as err:  # torch's DistNetworkError, DistStoreError, ...
            raise RendezvousError(f"{who} could not join the job at {where} within {timeout:g} s "
                                  f"({_first_line(err)}); check that rank 0 is running and that this machine "
                                  f"reaches {where} (MASTER_ADDR, MASTER_PORT), or wait longer with "
                                  "FSEG_DIST_TIMEOUT") from None
        finally:
            notice.cancel()


@contextlib.contextmanager
def _native_log_held():
    """While joining, torch's C++ layer logs every retry with ~40 lines of stack frames straight to
    file descriptor 2; hold them in a temporary file: replayed if the join succeeds, dropped if it
    fails (the RendezvousError line says it all). Yields the real stderr's descriptor."""
    import tempfile

    sys.stderr.flush()
    real = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = False
        try:
            yield real
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(real, 2)
            os.close(real)
            if not failed:
                held.seek(0)
                os.write(2, held.read())


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:160] if lines else ''}"


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

