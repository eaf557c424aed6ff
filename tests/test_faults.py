"""What a disk or a data set can do: full disks and forbidden folders at write time (one line, exit 2,
nothing left), an unwritable cache (a warning, the same results), test sets of one kind (the defined
metrics, n/a for the rest, the result files, exit 0)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import main_demo
import main_evaluate
import main_export
import main_predict
import main_train
import main_visualize
from codes import checkpoints, files, state_cache
from codes.checkpoints import save_module
from codes.errors import UserError
from codes.networks import EncoderHier

FULL = 'No space left on device; free some space there or choose another location'


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())


def exit_2(main, argv, capsys) -> str:
    """Runs an entry point that must fail with one line on stderr and exit status 2; returns that line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.count('\n') == 1, err
    return err.strip()


def mount_tmpfs(mount: Path, size: str) -> Path:
    mount.mkdir()
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f'cannot mount a small tmpfs ({done.stderr.strip()}): the full-disk tests need root')
    return mount


@pytest.fixture
def disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test (it needs root, as CI runs): a real file system that fills up."""
    yield mount_tmpfs(tmp_path / 'disk', '2m')
    subprocess.run(['umount', '-l', str(tmp_path / 'disk')], check=False)


@pytest.fixture
def big_disk(tmp_path):
    """A 256 MiB tmpfs: room for a memory bank, to be filled afterwards."""
    yield mount_tmpfs(tmp_path / 'big_disk', '256m')
    subprocess.run(['umount', '-l', str(tmp_path / 'big_disk')], check=False)


def fill(folder: Path) -> None:
    """Writes a file until the file system is full."""
    with open(folder / 'filler', 'wb') as f:
        try:
            while True:
                f.write(b'\0' * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    assert os.statvfs(folder).f_bavail == 0


@pytest.fixture
def work(synthetic_root, tmp_path, monkeypatch):
    torch.manual_seed(0)
    ckpt = tmp_path / 'enchier.pkl'
    save_module(EncoderHier(64, 64), ckpt)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    return {'root': synthetic_root, 'ckpt': ckpt,
            'flags': ['--obj=synthetic', f'--data_root={synthetic_root}', f'--ckpt={ckpt}', '--device=cpu']}


# ---------------------------------------------------------------- writes that fail

def test_atomic_writes_name_the_file_and_the_reason(tmp_path, monkeypatch):
    target = tmp_path / 'out.json'

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.os, 'fsync', no_space)
    with pytest.raises(UserError, match=f'^cannot write {target}: {FULL}$'):
        files.write_json(target, {'a': 1})
    with pytest.raises(UserError, match=f'^cannot write {tmp_path / "m.pt"}: {FULL}$'):
        checkpoints.torch_save(tmp_path / 'm.pt', {'w': torch.zeros(3)})   # torch's own error would be a RuntimeError
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):       # root writes anyway: the permission case cannot be made here
            return
        with pytest.raises(UserError, match='Permission denied; choose a location you may write to'):
            files.write_json(target, {})
    finally:
        os.chmod(tmp_path, 0o700)


def test_evaluate_on_a_full_disk(work, disk, capsys):
    fill(disk)
    line = exit_2(main_evaluate.main, work['flags'] + [f'--results_dir={disk / "results"}', '--no_cache'], capsys)
    assert line.startswith(f'error: cannot write {disk / "results" / "synthetic"}/') and line.endswith(FULL)
    assert leftovers(disk) == ['filler']


def test_export_on_a_full_disk(work, disk, capsys):
    out = disk / 'models' / 'synthetic.safetensors'      # the model (bank of 6 images) is larger than the disk
    line = exit_2(main_export.main, work['flags'] + [f'--out={out}', '--no_cache'], capsys)
    assert line == f'error: cannot write {out}: {FULL}'
    assert leftovers(disk) == []


def test_training_on_a_full_disk(work, disk, capsys):
    fill(disk)
    line = exit_2(main_train.main, ['--obj=synthetic', f'--data_root={work["root"]}', '--epochs=1', '--batch_size=8',
                                    f'--ckpt_dir={disk}', '--device=cpu'], capsys)
    assert line.startswith(f'error: cannot write {disk / "synthetic"}/') and line.endswith(FULL)
    assert leftovers(disk) == ['filler']


def test_visualize_and_predict_on_a_full_disk(work, disk, capsys, tmp_path):
    fill(disk)
    line = exit_2(main_visualize.main, work['flags'] + [f'--out_dir={disk / "maps"}', '--no_cache'], capsys)
    assert line.startswith(f'error: cannot write {disk / "maps"}/') and line.endswith(FULL)
    line = exit_2(main_predict.main, work['flags'] + ['--input', str(work['root'] / 'synthetic' / 'test'),
                                                      f'--out_dir={disk / "predictions"}', '--no_cache'], capsys)
    assert line.startswith(f'error: cannot write {disk / "predictions"}/') and line.endswith(FULL)
    assert leftovers(disk) == ['filler']


def test_demo_on_a_full_disk(disk, capsys):
    fill(disk)
    line = exit_2(main_demo.main, [f'--out_dir={disk / "demo"}'], capsys)
    assert line.startswith(f'error: cannot write {disk / "demo"}/') and line.endswith(FULL)
    assert leftovers(disk) == ['filler']


# ---------------------------------------------------------------- a cache that cannot be written

def evaluate_record(argv, capsys) -> tuple[dict, str]:
    main_evaluate.main(argv)
    out, err = capsys.readouterr()
    path = next(line for line in out.splitlines() if line.startswith('results written to ')).split(' to ', 1)[1]
    return json.loads(Path(path).read_text()), err


@pytest.mark.parametrize('method', ['patchsvdd', 'padim'])
def test_a_cache_too_small_is_a_warning_and_the_same_results(work, disk, method, capsys, tmp_path):
    flags = work['flags'] + [f'--method={method}']
    expected, _ = evaluate_record(flags + ['--no_cache', f'--results_dir={tmp_path / "r0"}'], capsys)
    for run in (1, 2):     # the first run leaves nothing that would stop the next
        record, err = evaluate_record(flags + [f'--cache_dir={disk}', f'--results_dir={tmp_path / f"r{run}"}'], capsys)
        warnings = [line for line in err.splitlines() if line.startswith('warning: ')]
        assert len(warnings) == 1 and 'No space left on device' in warnings[0] and 'without it' in warnings[0]
        assert record['metrics'] == expected['metrics']
        assert leftovers(disk) == []


def test_a_search_index_that_does_not_fit_beside_a_cached_bank_is_a_warning(work, big_disk, capsys, tmp_path):
    flags = work['flags'] + [f'--cache_dir={big_disk}']
    expected, _ = evaluate_record(flags + [f'--results_dir={tmp_path / "r0"}'], capsys)
    indexes = sorted(big_disk.rglob('exact*.npz'))
    assert [p.name for p in indexes] == ['exact32.npz', 'exact64.npz']
    for p in indexes:
        p.unlink()
    fill(big_disk)
    before = leftovers(big_disk)
    record, err = evaluate_record(flags + [f'--results_dir={tmp_path / "r1"}'], capsys)
    warnings = [line for line in err.splitlines() if line.startswith('warning: ')]
    assert len(warnings) == 2 and all('No space left on device' in w and 'exact' in w for w in warnings), err
    assert record['settings']['memory_bank'] == 'cached' and record['metrics'] == expected['metrics']
    assert leftovers(big_disk) == before


def test_a_read_only_cache_folder_is_a_warning(work, capsys, tmp_path):
    not_a_folder = tmp_path / 'cache_file'
    not_a_folder.write_text('x')
    assert state_cache.cache_dir_for(not_a_folder / 'cache', no_cache=False) is None
    assert 'warning: cannot create cache folder' in capsys.readouterr().err
    record, err = evaluate_record(work['flags'] + [f'--cache_dir={not_a_folder / "cache"}',
                                                   f'--results_dir={tmp_path / "r"}'], capsys)
    assert err.count('warning: ') == 1 and record['settings']['memory_bank'] == 'built'
    assert not_a_folder.read_text() == 'x'


# ---------------------------------------------------------------- test sets of one kind

@pytest.fixture
def one_kind(synthetic_root, tmp_path):
    """Two copies of the synthetic class: test/good removed (defective only, with masks), and the defects
    removed (normal only)."""
    defective = tmp_path / 'data' / 'defective'
    normal = tmp_path / 'data' / 'normal'
    shutil.copytree(synthetic_root / 'synthetic', defective)
    shutil.copytree(synthetic_root / 'synthetic', normal)
    shutil.rmtree(defective / 'test' / 'good')
    shutil.rmtree(normal / 'ground_truth')
    for folder in (normal / 'test').iterdir():
        if folder.name != 'good':
            shutil.rmtree(folder)
    return tmp_path / 'data'


@pytest.mark.parametrize('method', ['patchsvdd', 'padim'])
def test_a_test_set_of_defective_images_only(work, one_kind, method, capsys, tmp_path):
    record, err = evaluate_record(['--obj=defective', f'--data_root={one_kind}', f'--ckpt={work["ckpt"]}',
                                   '--device=cpu', '--no_cache', f'--method={method}',
                                   f'--results_dir={tmp_path / "r"}'], capsys)
    assert err.count('note: the test set holds defective images only') == 1
    for m in record['metrics'].values():
        assert m['det'] is None and m['f1_max'] is None and m['f1_threshold'] is None
        assert 0 <= m['seg'] <= 1 and 0 <= m['aupro'] <= 1 and 0 < m['pixel_ap'] <= 1
    assert (tmp_path / 'r' / 'summary.csv').is_file()


@pytest.mark.parametrize('method', ['patchsvdd', 'padim'])
def test_a_test_set_of_normal_images_only(work, one_kind, method, capsys, tmp_path):
    main_evaluate.main(['--obj=normal', f'--data_root={one_kind}', f'--ckpt={work["ckpt"]}', '--device=cpu',
                        '--no_cache', f'--method={method}', f'--results_dir={tmp_path / "r"}', '--save_maps'])
    out, err = capsys.readouterr()
    assert err.count('note: the test set holds normal images only') == 1
    assert 'Det:  n/a Seg:  n/a' in out.splitlines()[0]
    record = json.loads(next((tmp_path / 'r' / 'normal').glob('*.json')).read_text())
    assert all(v is None for m in record['metrics'].values() for v in m.values())
    with np.load(record['maps_npz']) as z:
        assert z['labels'].tolist() == [0, 0]


def test_visualize_a_test_set_of_defective_images_only(work, one_kind, capsys, tmp_path):
    main_visualize.main(['--obj=defective', f'--data_root={one_kind}', f'--ckpt={work["ckpt"]}', '--device=cpu',
                         '--no_cache', f'--out_dir={tmp_path / "maps"}'])
    assert {'roc_curve.png', 'pro_curve.png', 'index.html'} <= {p.name for p in (tmp_path / 'maps').iterdir()}
