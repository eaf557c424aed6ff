"""Bad input: a one-line error naming the file or flag, a non-zero exit, and nothing written."""
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_evaluate
import main_train
import main_visualize
from codes.checkpoints import save_module
from codes.networks import EncoderHier, PositionClassifier


def snapshot(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for f in folders for p in sorted(f.rglob('*')) if p.is_file()}


def fails(main, argv, capsys) -> str:
    """Runs an entry point that must fail; returns its one stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.count('\n') == 1 and 'Traceback' not in captured.err
    return captured.err.strip()


@pytest.fixture
def setup(synthetic_root, tmp_path, monkeypatch):
    """A writable copy of the synthetic class, a valid encoder checkpoint, and an empty working folder."""
    data = tmp_path / 'data'
    shutil.copytree(synthetic_root, data)
    torch.manual_seed(0)
    ckpt = tmp_path / 'enchier.pkl'
    save_module(EncoderHier(64, 64), ckpt)
    work = tmp_path / 'work'
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv('XDG_CACHE_HOME', str(work / 'cache'))
    monkeypatch.delenv('MVTEC_ROOT', raising=False)
    return data, ckpt, work


def evaluate_fails(setup, capsys, *extra) -> str:
    data, ckpt, work = setup
    before = snapshot(data, ckpt.parent)
    line = fails(main_evaluate.main, ['--obj=synthetic', f'--data_root={data}', f'--ckpt={ckpt}', *extra], capsys)
    assert snapshot(data, ckpt.parent) == before   # nothing written, anywhere
    assert list(work.iterdir()) == []
    return line


def test_empty_train_folder(setup, capsys):
    data = setup[0]
    for p in (data / 'synthetic' / 'train' / 'good').iterdir():
        p.unlink()
    assert evaluate_fails(setup, capsys) == (f'error: {data}/synthetic/train/good holds no images: '
                                             'a class needs normal training images')


def test_no_test_images(setup, capsys):
    data = setup[0]
    shutil.rmtree(data / 'synthetic' / 'test')
    assert evaluate_fails(setup, capsys) == (f'error: {data}/synthetic/test holds no images: '
                                             'expected test/<defect>/*.png and test/good/*.png')


def test_truncated_image(setup, capsys):
    path = setup[0] / 'synthetic' / 'train' / 'good' / '001.png'
    path.write_bytes(path.read_bytes()[:200])
    line = evaluate_fails(setup, capsys)
    assert line.startswith(f'error: cannot read image {path}: ') and 'truncated' in line


def test_file_named_as_image_that_is_not_one(setup, capsys):
    path = setup[0] / 'synthetic' / 'test' / 'good' / '000.png'
    path.write_text('not a picture')
    assert evaluate_fails(setup, capsys).startswith(f'error: cannot read image {path}: cannot identify image file')


def test_mask_of_another_size(setup, capsys):
    data = setup[0]
    mask = data / 'synthetic' / 'ground_truth' / 'spot' / '001_mask.png'
    Image.fromarray(np.zeros((50, 40), np.uint8)).save(mask)
    assert evaluate_fails(setup, capsys) == (f'error: mask {mask} is 40x50 but its image '
                                             f'{data}/synthetic/test/spot/001.png is 96x96: masks must match their images')


def test_mask_without_image(setup, capsys):
    data = setup[0]
    mask = data / 'synthetic' / 'ground_truth' / 'spot' / '007_mask.png'
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(mask)
    assert evaluate_fails(setup, capsys) == (f'error: mask {mask} has no test image: expected '
                                             f'{data}/synthetic/test/spot/007.<ext>; remove the mask or add its image')


def test_defective_image_without_mask(setup, capsys):
    data = setup[0]
    (data / 'synthetic' / 'ground_truth' / 'scratch' / '000_mask.png').unlink()
    assert evaluate_fails(setup, capsys) == (f'error: no mask for {data}/synthetic/test/scratch/000.png: expected '
                                             f'{data}/synthetic/ground_truth/scratch/000_mask.png')


def test_checkpoint_of_another_D(setup, capsys, tmp_path):
    other = tmp_path / 'd32.pkl'
    save_module(EncoderHier(64, 32), other)
    line = evaluate_fails(setup, capsys, f'--ckpt={other}')
    assert line.startswith(f'error: {other} does not fit EncoderHier: shapes differ (file vs model): '
                           'enc.conv8.weight (32, 32, 3, 3) vs (64, 32, 3, 3)')


def test_checkpoint_of_another_architecture(setup, capsys, tmp_path):
    other = tmp_path / 'cls.pkl'
    save_module(PositionClassifier(64, 64), other)
    assert evaluate_fails(setup, capsys, f'--ckpt={other}').startswith(
        f'error: {other} does not fit EncoderHier: missing keys conv1.bias, conv1.weight')


def test_file_that_is_not_a_checkpoint(setup, capsys, tmp_path):
    junk = tmp_path / 'junk.pkl'
    junk.write_bytes(os.urandom(1000))
    assert evaluate_fails(setup, capsys, f'--ckpt={junk}').startswith(
        f'error: {junk} is not a loadable PyTorch state_dict')


class RunsCode:
    """Unpickling this would run a shell command."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_pickle_that_would_run_code_is_refused_not_run(setup, capsys, tmp_path):
    evil = tmp_path / 'evil.pkl'
    marker = tmp_path / 'pwned'
    evil.write_bytes(pickle.dumps({'enc.conv1.weight': RunsCode(marker)}, protocol=2))
    line = evaluate_fails(setup, capsys, f'--ckpt={evil}')
    assert line.startswith(f'error: {evil} is not a loadable PyTorch state_dict (Weights only load failed')
    assert not marker.exists()


@pytest.mark.parametrize('flag,value,message', [
    ('--D', '0', 'argument --D: must be at least 1, not 0'),
    ('--epochs', '-3', 'argument --epochs: must be at least 1, not -3'),
    ('--epochs', 'ten', "argument --epochs: 'ten' is not a whole number"),
    ('--batch_size', '0', 'argument --batch_size: must be at least 1, not 0'),
    ('--repeat', '0', 'argument --repeat: must be at least 1, not 0'),
    ('--lr', '0', 'argument --lr: must be above 0, not 0'),
    ('--lr', 'nan', 'argument --lr: must be above 0, not nan'),
    ('--lambda_value', '-1', 'argument --lambda_value: must be at least 0, not -1'),
])
def test_numbers_out_of_range(flag, value, message, setup, capsys):
    data, _, work = setup
    line = fails(main_train.main, ['--obj=synthetic', f'--data_root={data}', f'{flag}={value}'], capsys)
    assert line == f'error: {message} (see main_train.py --help)'
    assert list(work.iterdir()) == []


def test_unwritable_output_folders(setup, capsys, tmp_path):
    data, ckpt, work = setup
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    assert evaluate_fails(setup, capsys, f'--results_dir={blocker}/results') == (
        f'error: cannot create results folder {blocker}/results/synthetic: Not a directory; choose another location')
    line = fails(main_visualize.main, ['--obj=synthetic', f'--data_root={data}', f'--ckpt={ckpt}',
                                       f'--out_dir={blocker}/pictures'], capsys)
    assert line == f'error: cannot create output folder {blocker}/pictures: Not a directory; choose another location'
    line = fails(main_train.main, ['--obj=synthetic', f'--data_root={data}', f'--ckpt_dir={blocker}/ckpts'], capsys)
    assert line == (f'error: cannot create checkpoint folder {blocker}/ckpts/synthetic: Not a directory; '
                    'choose another location')
    assert list(work.iterdir()) == []
