"""Training in several processes: PyTorch's torchrun starts them, DistributedDataParallel keeps them in step.

A thin layer around the training step, nothing home-made: the process group (gloo on the CPU, NCCL
on CUDA, each rank on the GPU numbered by its LOCAL_RANK), each rank's share of a global batch, and
the sum of the logged losses over ranks. Without torchrun everything here is a no-op and training is
the single process it always was.

Why the split is by hand and not torch's DistributedSampler: DistributedSampler deals a whole epoch
out rank by rank (and pads it), so the items of a step would depend on the number of ranks. Here
every step takes the same global batch as a single process would and cuts it into contiguous
slices (`torch.tensor_split`), so a seed gives the same run for any number of ranks.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import Interrupted, UserError

# Rank 0 evaluates (--eval_every) while the others wait in their next all-reduce; evaluating a large
# class takes minutes, more than NCCL's 10-minute default. A rank that dies is noticed at once anyway
# (its connections close); the timeout only bounds a rank that hangs.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


class RankError(UserError):
    """A problem of one rank only (its GPU, say): every rank that has it reports it, not just rank 0."""


class PeerStopped(UserError):
    """Another rank failed or was stopped, so this one cannot go on."""
    exit_code = 1


class Terminated(BaseException):
    """SIGTERM (what torchrun sends the other ranks when one fails) or SIGINT under torchrun.

    A BaseException, so that no `except Exception` on the way swallows it, like KeyboardInterrupt.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Context:
    """Which process this is. The default is a single process on the CPU, not under torchrun."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device('cpu'))
    launched: bool = False    # started by torchrun: a process group exists (even with one rank)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files and prints the epoch lines."""
        return self.rank == 0


def launched() -> bool:
    """True in a process started by torchrun (torch.distributed.run)."""
    return dist.is_available() and dist.is_torchelastic_launched()


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of a rank: the CPU, or the GPU numbered LOCAL_RANK on its machine."""
    if device.type != 'cuda':
        return device
    if device.index is not None:
        raise UserError(f'--device {device}: under torchrun each rank uses the GPU numbered by its LOCAL_RANK; '
                        'pass --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)')
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RankError(f'rank with LOCAL_RANK {local_rank}: this machine shows {count} GPU(s); start at most '
                        f'{count} processes on it (--nproc_per_node={count})')
    return torch.device('cuda', local_rank)


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[Context]:
    """The process group for the run, when under torchrun; else a single-process Context on `device`.

    Under torchrun, SIGTERM and SIGINT raise Terminated once (a second one is ignored, so a message
    can still be printed), and ranks other than 0 stay silent about errors every rank has alike.
    """
    if not launched():
        yield Context(device=device)
        return
    rank, world, local = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    try:
        device = rank_device(device, local)
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        previous = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGINT, signal.SIGTERM)}
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device.type == 'cuda' else None)
        try:
            yield Context(rank, world, local, device, launched=True)
        except BaseException:
            # On the way out with an error: torchrun's SIGTERM must not kill this rank before it has
            # printed its line, so signals are ignored from here rather than given back their default.
            for s in previous:
                signal.signal(s, signal.SIG_IGN)
            raise
        else:
            for s, handler in previous.items():
                signal.signal(s, handler)
            # every rank reaches the teardown together: a rank that tears gloo down while its peer is still
            # exchanging with it can die in C++ ("terminate called without an active exception")
            dist.barrier()
        finally:
            with contextlib.suppress(Exception):   # after a peer failed, tearing down may complain too
                dist.destroy_process_group()
    except (UserError, Terminated) as e:
        if rank != 0 and not isinstance(e, (RankError, PeerStopped)):
            raise SystemExit(getattr(e, 'exit_code', 130)) from None   # rank 0 reports what all ranks share
        if isinstance(e, Terminated):   # outside the epochs (which report their own state)
            raise Interrupted(f'stopped by {e} outside the training epochs; no file is left half-written') from None
        raise


def _raise_terminated(signum: int, frame) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


def shard(global_batch: list[int], ctx: Context) -> tuple[list[int], float]:
    """This rank's contiguous slice of a global batch, and its share of the batch (slice / batch size).

    A batch smaller than the world leaves some ranks without items: such a rank takes the batch's
    first item with share 0, so it still joins the gradient all-reduce but adds nothing to it.
    """
    items = torch.tensor_split(torch.tensor(global_batch), ctx.world_size)[ctx.rank].tolist()
    if not items:
        return global_batch[:1], 0.0
    return items, len(items) / len(global_batch)


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """The model under DistributedDataParallel when under torchrun; else the model itself.

    static_graph: the position classifiers' last weight never gets a gradient (kept from the original,
    see networks.NormalizedLinear) and the set of used parameters never changes, so DDP learns it once
    instead of searching the graph for unused parameters every step.
    """
    if not ctx.launched:
        return model
    return DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == 'cuda' else None,
                                   static_graph=True)


def backward_scale(share: float, ctx: Context) -> float:
    """Factor on a rank's mean loss so that DDP's gradient (the mean over ranks) is the global batch's mean:
    sum_r share_r * grad(mean loss_r) = (1 / world) * sum_r (world * share_r) * grad(mean loss_r).
    Exactly 1.0 for a single process."""
    return share * ctx.world_size


def sum_over_ranks(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The element-wise sum of `t` over all ranks (in place); `t` itself for a single process."""
    if ctx.launched:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_from_main(obj: object, ctx: Context) -> object:
    """Rank 0's `obj` on every rank (the training state read on rank 0's machine)."""
    if not ctx.launched:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.device.type == 'cuda' else None)
    return box[0]


def local_world_size() -> int:
    """Processes on this machine (1 outside torchrun)."""
    return int(os.environ.get('LOCAL_WORLD_SIZE', 1))


def is_peer_failure(e: BaseException, ctx: Context) -> bool:
    """Whether a collective failed because another rank went away (its connections closed) rather
    than a fault of this rank's own."""
    if not ctx.launched:
        return False
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return any(s in text for s in ('connection closed', 'connection reset', 'broken pipe', 'gloo', 'nccl'))


def first_line(e: BaseException) -> str:
    """An error's first sentence without a leading `[file.cc:123]` source location, shortened: what a
    one-line report can carry (gloo's: `Read error [127.0.0.1]:36264: Connection reset by peer`)."""
    text = re.sub(r'^\[[^\]]*\]\s*', '', str(e).strip())
    text = text.splitlines()[0] if text else type(e).__name__
    return text.split('. ')[0][:160]
