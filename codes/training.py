"""Training Patch SVDD on a class's normal images (SPEC.md, "Training"), read top to bottom.

`epochs` means that many passes over the data (the original's loop skipped training at its first
index, so its `--epochs 300` made 299). After every epoch the resumable state is saved; at the end
the encoder and both position classifiers are saved under the fork's names.
"""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoints, mvtecad
from .datasets import to_device, training_datasets
from .errors import Interrupted, UserError
from .files import append_csv_row, atomic_save, check_writable, make_dir
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
    batch_size: int = 64
    repeat: int = 100
    num_workers: int = 0
    seed: int = 0
    resize: str = 'nearest'
    device: str = 'cpu'
    resume: bool = False

    @property
    def name(self) -> str:
        return checkpoints.fork_name(self.epochs, self.lambda_value, self.D)

    @property
    def folder(self) -> Path:
        return self.ckpt_dir / self.obj

    def path(self, suffix: str) -> Path:
        """Files beside the encoder: <epochs>_<lambda>_<D>_<suffix>."""
        return self.folder / self.name.replace(checkpoints.AUTHORS_NAME, suffix)


class StopRequest:
    """While active, Ctrl-C (SIGINT) asks the loop to stop at the next step boundary instead of
    interrupting a step halfway; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
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


def train(cfg: TrainConfig, on_epoch_end: Callable[[int, EncoderHier], dict] | None = None) -> Path:
    """Trains and returns the encoder's path. `on_epoch_end(epoch, enc)` may return extra values to log.

    Raises Interrupted after saving the state when stopped by Ctrl-C.
    """
    device = torch.device(cfg.device)
    check_writable(cfg.folder, 'checkpoint')
    files = mvtecad.find_class(cfg.data_root, cfg.obj)
    train_images = mvtecad.load_images(files.train, cfg.resize, f'{cfg.obj} train')
    x = mvtecad.standardize(train_images, mvtecad.mean_image(train_images))

    torch.manual_seed(cfg.seed)
    # channels-last: the same math, ~6% faster per step on a CPU (benchmarks/train_speed.py)
    enc = EncoderHier(64, cfg.D).to(device, memory_format=torch.channels_last)
    cls_64 = PositionClassifier(64, cfg.D).to(device)
    cls_32 = PositionClassifier(32, cfg.D).to(device)
    modules = {'enc': enc, 'cls_64': cls_64, 'cls_32': cls_32}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    progress = Progress(epoch=1, step=0, sums=dict.fromkeys(LOSS_NAMES, 0.0))
    if cfg.resume:
        progress = load_state(cfg, modules, opt)
        print(f'resuming from {cfg.path("state.pt")} at epoch {progress.epoch}, step {progress.step}')

    dataset = training_datasets(x, cfg.repeat, cfg.seed, with_svdd=cfg.lambda_value > 0)
    log_path = cfg.path('log.csv')
    with StopRequest() as stop:
        while progress.epoch <= cfg.epochs:
            epoch = progress.epoch
            dataset.set_epoch(epoch)
            # The order is a function of (seed, epoch), so a resumed epoch skips exactly the finished steps.
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
            batches = [b.tolist() for b in order.split(cfg.batch_size)]
            loader = DataLoader(dataset, batch_sampler=batches[progress.step:], num_workers=cfg.num_workers,
                                pin_memory=device.type == 'cuda')
            for m in modules.values():
                m.train()
            started = time.perf_counter()
            for batch in tqdm(loader, desc=f'epoch {epoch}/{cfg.epochs}', unit='batch', initial=progress.step,
                              total=len(batches), leave=False, disable=None):
                losses = patch_svdd_losses(enc, cls_64, cls_32, to_device(batch, device), cfg.lambda_value)
                opt.zero_grad(set_to_none=True)
                losses['total'].backward()
                opt.step()
                for k, v in losses.items():
                    progress.sums[k] += v.item()
                progress.step += 1
                if stop.requested:
                    save_state(cfg, modules, opt, progress)
                    raise Interrupted(f'training stopped at epoch {epoch}, step {progress.step} of '
                                      f'{len(batches)}; state saved to {cfg.path("state.pt")}: continue with '
                                      'the same command and --resume')
            means = {k: progress.sums[k] / progress.step for k in LOSS_NAMES}
            row = {'epoch': epoch, **means, 'seconds': round(time.perf_counter() - started, 2)}
            print(f'epoch {epoch}/{cfg.epochs}  ' + '  '.join(f'{k} {v:.5f}' for k, v in means.items())
                  + f'  ({row["seconds"]:.1f}s)', flush=True)
            progress = Progress(epoch=epoch + 1, step=0, sums=dict.fromkeys(LOSS_NAMES, 0.0))
            save_state(cfg, modules, opt, progress)
            if on_epoch_end is not None:
                row.update(on_epoch_end(epoch, enc) or {})
            append_csv_row(log_path, row)

    enc_path = cfg.folder / cfg.name
    checkpoints.save_module(cls_64, cfg.folder / checkpoints.classifier_name(cfg.name, 64))
    checkpoints.save_module(cls_32, cfg.folder / checkpoints.classifier_name(cfg.name, 32))
    checkpoints.save_module(enc, enc_path)   # last, so an encoder on disk means a finished run
    return enc_path


@dataclass
class Progress:
    """Where training is: the epoch under way, the steps of it done, and their summed losses."""
    epoch: int
    step: int
    sums: dict[str, float]


def save_state(cfg: TrainConfig, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
               progress: Progress) -> None:
    """Everything --resume needs; the data order and patches are functions of (seed, epoch), so no RNG state."""
    state = {'epoch': progress.epoch, 'step': progress.step, 'sums': progress.sums,
             'config': {k: str(v) for k, v in asdict(cfg).items()},
             'optimizer': opt.state_dict(), **{k: m.state_dict() for k, m in modules.items()}}
    make_dir(cfg.folder, 'checkpoint')
    atomic_save(cfg.path('state.pt'), lambda f: torch.save(state, f))


def load_state(cfg: TrainConfig, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer) -> Progress:
    path = cfg.path('state.pt')
    if not path.is_file():
        raise UserError(f'--resume: no saved training state at {path}; start without --resume')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
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
