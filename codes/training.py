"""Training Patch SVDD on a class's normal images (SPEC.md, "Training"), read top to bottom.

`epochs` means that many passes over the data (the original's loop skipped training at its first
index, so its `--epochs 300` made 299). After every epoch the resumable state is saved; at the end
the encoder and both position classifiers are saved under the fork's names.

Under torchrun the same loop runs in every process on its share of each step's batch, and
DistributedDataParallel averages the gradients (codes/distributed.py).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import checkpoints, distributed, mvtecad
from .datasets import DictionaryConcatDataset, to_device, training_datasets
from .errors import Interrupted, UserError
from .files import append_csv_row, check_writable, make_dir
from .losses import patch_svdd_losses
from .networks import EncoderHier, PositionClassifier

LOSS_NAMES = ('pos_64', 'pos_32', 'svdd_64', 'svdd_32', 'total')


@dataclass(frozen=True)
class TrainConfig:
    obj: str
    data_root: Path
    ckpt_dir: Path = Path('ckpts')
    epochs: int = 300
    lambda_value: float = 1e-3
    D: int = 64
    lr: float = 1e-4
    batch_size: int = 64          # the global batch: pairs of each kind per step, split across ranks
    repeat: int = 100
    num_workers: int | None = 0   # None: loader_workers() decides
    seed: int = 0
    resize: str = 'nearest'
    device: str = 'cpu'
    resume: bool = False
    amp: bool = False             # bf16 autocast (CUDA only)

    @property
    def name(self) -> str:
        return checkpoints.fork_name(self.epochs, self.lambda_value, self.D)

    @property
    def folder(self) -> Path:
        return self.ckpt_dir / self.obj

    def path(self, suffix: str) -> Path:
        """Files beside the encoder: <epochs>_<lambda>_<D>_<suffix>."""
        return self.folder / self.name.replace(checkpoints.AUTHORS_NAME, suffix)


class PatchSVDD(nn.Module):
    """The three trained networks as one module whose forward is the losses of a batch, so that
    DistributedDataParallel sees one forward pass per step."""

    def __init__(self, D: int, lambda_value: float):
        super().__init__()
        self.enc = EncoderHier(64, D)
        self.cls_64 = PositionClassifier(64, D)
        self.cls_32 = PositionClassifier(32, D)
        self.lambda_value = lambda_value

    def forward(self, batch: dict[str, tuple]) -> dict[str, torch.Tensor]:
        return patch_svdd_losses(self.enc, self.cls_64, self.cls_32, batch, self.lambda_value)

    def parts(self) -> dict[str, nn.Module]:
        """The networks under the keys of the saved training state."""
        return {'enc': self.enc, 'cls_64': self.cls_64, 'cls_32': self.cls_32}


class StopRequest:
    """While active, Ctrl-C (SIGINT) asks the loop to stop at the next step boundary instead of
    interrupting a step halfway; a second Ctrl-C interrupts at once.

    Off under torchrun: every rank would have to agree on the step to stop at, and torchrun passes
    Ctrl-C on to its processes a second time anyway; there the state of the last epoch is kept.
    """

    def __init__(self, enabled: bool = True):
        self.requested = False
        self.enabled = enabled
        self._previous = None

    def __enter__(self) -> StopRequest:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print('\nstopping after this step (Ctrl-C again to stop at once)', flush=True)


def train(cfg: TrainConfig, on_epoch_end: Callable[[int, EncoderHier], dict] | None = None,
          ctx: distributed.Context | None = None) -> Path:
    """Trains and returns the encoder's path. `on_epoch_end(epoch, enc)` may return extra values to log.

    `ctx` says which rank this is under torchrun (distributed.session); without it, one process on
    cfg.device. Every rank runs this same loop on its share of each global batch; rank 0 alone
    writes files, prints and calls `on_epoch_end`. Raises Interrupted after saving the state when
    stopped by Ctrl-C (a single process), or naming the state kept when a rank stops (torchrun).
    """
    ctx = ctx or distributed.Context(device=torch.device(cfg.device))
    device = ctx.device
    if cfg.amp and device.type != 'cuda':
        raise UserError(f'--amp: bf16 autocast needs a CUDA device, not {device}; leave out --amp on the CPU')
    if ctx.is_main:
        check_writable(cfg.folder, 'checkpoint')
    files = mvtecad.find_class(cfg.data_root, cfg.obj)
    train_images = mvtecad.load_images(files.train, cfg.resize, f'{cfg.obj} train')
    x = mvtecad.standardize(train_images, mvtecad.mean_image(train_images))

    torch.manual_seed(cfg.seed)
    model = PatchSVDD(cfg.D, cfg.lambda_value).to(device)
    # channels-last: the same math, ~6% faster per step on a CPU (benchmarks/train_speed.py), and the
    # layout tensor cores want on a GPU
    model.enc.to(memory_format=torch.channels_last)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True   # patch sizes never change: let cuDNN pick the fastest kernels
    # fused: one kernel for the whole Adam update on a GPU instead of a few per parameter
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == 'cuda')
    progress = Progress(epoch=1, step=0, sums=dict.fromkeys(LOSS_NAMES, 0.0))
    if cfg.resume:
        progress = load_state(cfg, model.parts(), opt, ctx)
        if ctx.is_main:
            print(f'resuming from {cfg.path("state.pt")} at epoch {progress.epoch}, step {progress.step}', flush=True)
    saved = (progress.epoch, progress.step) if cfg.resume else None

    dataset = training_datasets(x, cfg.repeat, cfg.seed, with_svdd=cfg.lambda_value > 0)
    workers = loader_workers(cfg.num_workers, device)
    # One loader for the whole run, so its workers prepare the next epoch's first batches while rank 0
    # saves and evaluates.
    loader = DataLoader(EpochItems(dataset), batch_sampler=RunBatches(cfg, ctx, len(dataset), progress),
                        num_workers=workers, pin_memory=device.type == 'cuda',
                        prefetch_factor=4 if workers else None)
    batches = iter(loader)
    step_fn = distributed.wrap(model, ctx)
    present = [k for k in LOSS_NAMES if cfg.lambda_value > 0 or not k.startswith('svdd')]   # as the losses' keys
    where = torch.tensor([LOSS_NAMES.index(k) for k in present], device=device)
    # Summed on the device and read once an epoch: reading a loss each step would stall a GPU.
    # Rank 0 carries the sums of a resumed epoch's finished steps; the all-reduce adds the ranks up.
    sums = torch.tensor([progress.sums[k] if ctx.is_main else 0.0 for k in LOSS_NAMES], dtype=torch.float64,
                        device=device)
    log_path = cfg.path('log.csv')
    epoch = progress.epoch
    try:
        with StopRequest(enabled=not ctx.launched) as stop:
            while progress.epoch <= cfg.epochs:
                epoch = progress.epoch
                shares = [distributed.shard(b, ctx)[1] for b in epoch_batches(cfg, epoch, len(dataset))]
                model.train()
                started = time.perf_counter()
                for share in tqdm(shares[progress.step:], desc=f'epoch {epoch}/{cfg.epochs}', unit='batch',
                                  initial=progress.step, total=len(shares), leave=False,
                                  disable=None if ctx.is_main else True):
                    batch = to_device(next(batches), device)
                    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=cfg.amp):
                        losses = step_fn(batch)
                    scale = distributed.backward_scale(share, ctx)
                    opt.zero_grad(set_to_none=True)
                    (losses['total'] if scale == 1.0 else losses['total'] * scale).backward()
                    opt.step()
                    sums.index_add_(0, where, torch.stack([losses[k].detach() for k in present]).double(),
                                    alpha=share)
                    progress.step += 1
                    if stop.requested:
                        progress.sums = dict(zip(LOSS_NAMES, sums.tolist()))
                        save_state(cfg, model.parts(), opt, progress, ctx)
                        raise Interrupted(f'training stopped at epoch {epoch}, step {progress.step} of '
                                          f'{len(shares)}; state saved to {cfg.path("state.pt")}: continue with '
                                          'the same command and --resume')
                means = {k: v / progress.step for k, v in
                         zip(LOSS_NAMES, distributed.sum_over_ranks(sums, ctx).tolist())}
                sums.zero_()
                progress = Progress(epoch=epoch + 1, step=0, sums=dict.fromkeys(LOSS_NAMES, 0.0))
                if not ctx.is_main:
                    saved = (progress.epoch, 0)
                    continue
                row = {'epoch': epoch, **means, 'seconds': round(time.perf_counter() - started, 2)}
                save_state(cfg, model.parts(), opt, progress, ctx)
                saved = (progress.epoch, 0)
                # printed once the state is on disk: a run stopped after this line resumes from here
                print(f'epoch {epoch}/{cfg.epochs}  ' + '  '.join(f'{k} {v:.5f}' for k, v in means.items())
                      + f'  ({row["seconds"]:.1f}s)', flush=True)
                if on_epoch_end is not None:
                    row.update(on_epoch_end(epoch, model.enc) or {})
                append_csv_row(log_path, row)
    except distributed.Terminated as e:
        raise Interrupted(f'training stopped by {e} in epoch {epoch}; {kept_state(cfg, saved)}') from None
    except RuntimeError as e:
        if not distributed.is_peer_failure(e, ctx):
            raise
        raise distributed.PeerStopped(f'rank {ctx.rank}: training stopped in epoch {epoch}: another rank failed or '
                                      f'was stopped ({distributed.first_line(e)}); {kept_state(cfg, saved)}') from None

    enc_path = cfg.folder / cfg.name
    if ctx.is_main:
        checkpoints.save_module(model.cls_64, cfg.folder / checkpoints.classifier_name(cfg.name, 64))
        checkpoints.save_module(model.cls_32, cfg.folder / checkpoints.classifier_name(cfg.name, 32))
        checkpoints.save_module(model.enc, enc_path)   # last, so an encoder on disk means a finished run
    return enc_path


def kept_state(cfg: TrainConfig, saved: tuple[int, int] | None) -> str:
    """What --resume will continue from, for the message of a stopped run."""
    if saved is None:
        return 'no state was saved yet: run the same command again'
    epoch, step = saved
    where = f'after epoch {epoch - 1}' if step == 0 else f'at epoch {epoch}, step {step}'
    return (f'the state saved {where} is kept at {cfg.path("state.pt")}: continue with the same command and '
            '--resume (with any number of processes)')


def epoch_batches(cfg: TrainConfig, epoch: int, n_items: int) -> list[list[int]]:
    """The global batches of an epoch, a function of (seed, epoch): a resumed epoch skips exactly the
    finished steps, and every rank cuts the same batches."""
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
    return [b.tolist() for b in order.split(cfg.batch_size)]


class RunBatches:
    """The loader's batch sampler: this rank's share of every step left in the run, as (epoch, index) keys."""

    def __init__(self, cfg: TrainConfig, ctx: distributed.Context, n_items: int, start: Progress):
        self.cfg, self.ctx, self.n_items = cfg, ctx, n_items
        self.epoch, self.step = start.epoch, start.step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in range(self.epoch, self.cfg.epochs + 1):
            first = self.step if epoch == self.epoch else 0
            for batch in epoch_batches(self.cfg, epoch, self.n_items)[first:]:
                yield [(epoch, i) for i in distributed.shard(batch, self.ctx)[0]]

    def __len__(self) -> int:
        per_epoch = -(-self.n_items // self.cfg.batch_size)
        return per_epoch * (self.cfg.epochs - self.epoch + 1) - self.step


class EpochItems(Dataset):
    """A training dataset indexed by (epoch, index): items drawn from the same per-item generators as
    dataset.set_epoch(epoch); dataset[index] would, in whichever loader worker they are made."""

    def __init__(self, dataset: DictionaryConcatDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, tuple]:
        epoch, idx = key
        self.dataset.set_epoch(epoch)
        return self.dataset[idx]


def loader_workers(requested: int | None, device: torch.device) -> int:
    """--num_workers, or by default: none on the CPU (workers would take cores from the step itself), and
    on a GPU enough processes to make batches as fast as the GPU uses them (up to 8, sharing this
    machine's cores with the other ranks on it)."""
    if requested is not None:
        return requested
    if device.type != 'cuda':
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, min(8, cores // distributed.local_world_size() - 1))


@dataclass
class Progress:
    """Where training is: the epoch under way, the steps of it done, and their summed losses."""
    epoch: int
    step: int
    sums: dict[str, float]


def save_state(cfg: TrainConfig, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
               progress: Progress, ctx: distributed.Context | None = None) -> None:
    """Everything --resume needs; the data order and patches are functions of (seed, epoch), so no RNG
    state, and nothing depends on the number of ranks (kept for information only)."""
    state = {'epoch': progress.epoch, 'step': progress.step, 'sums': progress.sums,
             'config': {k: str(v) for k, v in asdict(cfg).items()},
             'world_size': ctx.world_size if ctx else 1,
             'optimizer': opt.state_dict(), **{k: m.state_dict() for k, m in modules.items()}}
    make_dir(cfg.folder, 'checkpoint')
    checkpoints.torch_save(cfg.path('state.pt'), state)


def load_state(cfg: TrainConfig, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
               ctx: distributed.Context | None = None) -> Progress:
    """Loads the saved state into the networks and the optimizer. Under torchrun rank 0 reads the file
    and sends it to the other ranks, so only rank 0's machine needs it (as only rank 0 writes it)."""
    ctx = ctx or distributed.Context()
    path = cfg.path('state.pt')
    state = problem = None
    if ctx.is_main:
        if not path.is_file():
            problem = f'--resume: no saved training state at {path}; start without --resume'
        else:
            try:
                state = torch.load(path, map_location='cpu', weights_only=True)
            except Exception as e:  # any unreadable file is the same user problem as below
                problem = (f'--resume: {path} is not a usable training state ({type(e).__name__}); '
                           'start without --resume')
    state, problem = distributed.broadcast_from_main((state, problem), ctx)
    if problem:
        raise UserError(problem)
    try:
        for k, m in modules.items():
            m.load_state_dict(state[k])
        opt.load_state_dict(state['optimizer'])
        progress = Progress(int(state['epoch']), int(state['step']), dict(state['sums']))
        saved = state['config']
    except Exception as e:  # any unreadable or mismatching state file is the same user problem
        raise UserError(f'--resume: {path} is not a usable training state ({type(e).__name__}); '
                        'start without --resume') from None
    for flag in ('seed', 'batch_size', 'repeat', 'lr', 'resize'):
        if saved.get(flag) != str(getattr(cfg, flag)):
            raise UserError(f'--resume: {path} was trained with --{flag} {saved.get(flag)}, not '
                            f'{getattr(cfg, flag)}; pass the same value')
    return progress
