"""main_export.py and main_predict.py as a user runs them: the model file round trip, predictions checked
against independent computations, bad inputs and bad models, and agreement with main_evaluate.py."""
import csv
import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

import main_evaluate
import main_export
import main_predict
from codes import model_file
from codes.checkpoints import file_sha256, load_encoder, save_module
from codes.memory_bank import build_bank
from codes.mvtecad import find_class, load_class, load_images
from codes.networks import EncoderHier
from codes.memory_bank import MemoryBank
from codes.methods.patchsvdd import PatchSVDDDetector, normal_scores
from codes.thresholds import min_max_normalize

def exits(main, argv, capsys, code: int) -> tuple[str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == code
    captured = capsys.readouterr()
    assert 'Traceback' not in captured.err
    return captured.out, captured.err


def predict_ok(argv, capsys) -> str:
    main_predict.main(argv)       # returns normally: exit status 0
    return capsys.readouterr().out


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def exported(synthetic_root, tmp_path_factory):
    """The synthetic class, a random encoder, and the model main_export.py wrote for them (exact search)."""
    work = tmp_path_factory.mktemp('export')
    torch.manual_seed(0)
    ckpt = work / 'enchier.pkl'
    save_module(EncoderHier(64, 64), ckpt)
    out = work / 'models' / 'synthetic.safetensors'
    argv = ['--obj=synthetic', f'--data_root={synthetic_root}', f'--ckpt={ckpt}', '--nn=exact', '--device=cpu',
            f'--cache_dir={work / "cache"}', f'--out={out}']
    main_export.main(argv)
    return {'root': synthetic_root, 'ckpt': ckpt, 'model': out, 'argv': argv, 'work': work}


def test_model_file_holds_everything_and_loads_without_pickle(exported):
    with safe_open(str(exported['model']), 'np') as f:      # any safetensors reader: no code runs
        meta = json.loads(f.metadata()['patchsvdd'])
        names = set(f.keys())
    assert meta['format'] == 'patchsvdd-model' and meta['format_version'] == 2 and meta['method'] == 'patchsvdd'
    assert (meta['settings'], meta['preprocessing']) == ({'D': 64, 'nn': 'exact'},
                                                         {'resize': 'nearest', 'size': 256, 'crop': None})
    assert meta['info']['checkpoint_sha256'] == file_sha256(exported['ckpt'])
    assert {'state.mean', 'state.emb64', 'state.emb32', 'weights.enc.conv1.weight', 'weights.conv2.bias'} <= names
    # the exact search's cell indexes travel with the model, so predict does not rebuild them
    assert {f'index.exact{K}.{a}' for K in ('64', '32') for a in ('centroids', 'rows', 'starts', 'radius')} <= names
    t = meta['thresholds']
    assert t['image_source'] == 'f1' and t['pixel_source'] == 'f1'   # the class has defects and masks


def test_round_trip_gives_the_same_scores(exported, tmp_path):
    """The file's bank and encoder give the scores that the checkpoint and images give directly, and a
    model saved again from a loaded one is the same model."""
    loaded = model_file.load_model(exported['model'])
    files = find_class(exported['root'], 'synthetic')
    enc = load_encoder(exported['ckpt'], 64)
    bank = build_bank(enc, load_images(files.train, 'nearest', 'train'), 'cpu')     # independently of the export
    for name in ('mean', 'emb64', 'emb32'):
        assert np.allclose(getattr(loaded, name), getattr(bank, name), atol=1e-6)
    test = load_class(files, 'nearest', train=False).test
    direct = PatchSVDDDetector(enc, bank, None, 'nearest').maps(test)
    search = MemoryBank(loaded.mean, loaded.emb64, loaded.emb32, index=loaded.index)
    from_file = PatchSVDDDetector(loaded.encoder_module(), search, loaded.thresholds, loaded.resize, loaded.nn).maps(test)
    assert np.allclose(from_file, direct, rtol=1e-5, atol=0)
    model_file.save_model(loaded, tmp_path / 'again.safetensors')
    again = model_file.load_model(tmp_path / 'again.safetensors')
    assert again.thresholds == loaded.thresholds and again.info == loaded.info and again.nn == loaded.nn
    assert all(np.array_equal(again.encoder[k], v) for k, v in loaded.encoder.items())
    assert all(np.array_equal(getattr(again, n), getattr(loaded, n)) for n in ('mean', 'emb64', 'emb32'))


def test_predict_with_model_writes_rows_maps_masks_pictures_and_index(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)          # runs from any folder
    out = tmp_path / 'out'
    test_dir = exported['root'] / 'synthetic' / 'test'
    stdout = predict_ok(['--model', str(exported['model']), '--input', str(test_dir), f'--out_dir={out}',
                         '--save_maps=npy', '--save_masks', '--no_cache'], capsys)
    model = model_file.load_model(exported['model'])
    t = model.thresholds
    rows = read_csv(out / 'predictions.csv')
    assert [r['path'] for r in rows] == sorted(str(p) for p in test_dir.rglob('*.png'))
    summary = json.loads((out / 'predictions.json').read_text())
    assert summary['thresholds'] == t.to_dict() and summary['n_failed'] == 0
    for row, item in zip(rows, summary['images']):
        name = '__'.join(Path(row['path']).relative_to(test_dir).with_suffix('').parts)
        raw = np.load(out / 'maps' / f'{name}.npy', allow_pickle=False)
        mask = np.asarray(Image.open(out / 'masks' / f'{name}.png'))
        score = float(row['score'])
        assert raw.shape == (256, 256) and raw.dtype == np.float32
        assert score == pytest.approx(float(raw.max()), rel=1e-6) and item['score'] == score
        assert float(row['normalized_score']) == pytest.approx(np.clip((score - t.image) / (t.image_max - t.image_min)
                                                                       + 0.5, 0, 1))
        assert row['decision'] == ('anomalous' if score >= t.image else 'normal')
        assert set(np.unique(mask)) <= {0, 255}
        # the mask is the float64 map >= the pixel threshold; the saved map is its float32 copy
        assert np.mean((mask == 255) != (raw >= t.pixel)) < 1e-3
        assert float(row['anomalous_area']) == pytest.approx((mask == 255).mean())
        assert row['error'] == '' and item['error'] is None
        assert Image.open(out / 'pictures' / f'{name}.png').size == (512, 256)
    # the defective ones are found on this easy class (spots, scratches), the normal ones are not flagged
    assert [r['decision'] for r in rows if '/good/' in r['path']] == ['normal', 'normal']
    page = (out / 'index.html').read_text()
    shown = [float(s) for s in re.findall(r'&middot; score ([0-9.e+-]+) \(normalised', page)]
    assert shown == sorted(shown, reverse=True) and len(shown) == 6
    assert page.count('<figure class="anomalous">') == sum(r['decision'] == 'anomalous' for r in rows)
    assert '6 images predicted' in stdout


def test_predict_agrees_with_predictor_and_formats(exported, tmp_path, capsys):
    """tiff and png16 maps hold the same map (raw float32; normalised 16-bit)."""
    image = exported['root'] / 'synthetic' / 'test' / 'spot' / '000.png'
    for fmt in ('tiff', 'png16'):
        predict_ok(['--model', str(exported['model']), '--input', str(image), f'--out_dir={tmp_path / fmt}',
                    f'--save_maps={fmt}', '--no_pictures', '--no_cache'], capsys)
    model = model_file.load_model(exported['model'])
    import tifffile
    raw = tifffile.imread(tmp_path / 'tiff' / 'maps' / '000.tiff')
    level = np.asarray(Image.open(tmp_path / 'png16' / 'maps' / '000.png'))
    assert raw.dtype == np.float32 and level.dtype == np.uint16
    t = model.thresholds
    assert np.abs(level / 65535 - min_max_normalize(raw, t.pixel, t.pixel_min, t.pixel_max)).max() < 2e-5
    row = read_csv(tmp_path / 'tiff' / 'predictions.csv')[0]
    assert float(row['score']) == pytest.approx(float(raw.max()), rel=1e-6)
    assert not (tmp_path / 'tiff' / 'pictures').exists()


def test_ngt_index_is_built_once_into_the_cache_and_reused(exported, tmp_path, capsys):
    """--nn ngt: the index goes to <cache_dir>/models/<bank id>/ngt32 and later runs open it; NGT is
    approximate (very much so on this random encoder's near-identical codes), so its scores are never below
    exact search's."""
    test_dir = exported['root'] / 'synthetic' / 'test'
    common = ['--model', str(exported['model']), '--input', str(test_dir), '--no_pictures']
    predict_ok(common + [f'--out_dir={tmp_path / "exact"}', '--no_cache'], capsys)
    predict_ok(common + [f'--out_dir={tmp_path / "ngt"}', '--nn=ngt', f'--cache_dir={tmp_path / "cache"}'], capsys)
    index = tmp_path / 'cache' / 'models' / model_file.load_model(exported['model']).bank_id / 'ngt32'
    assert index.is_dir()
    stamp = {p.name: p.stat().st_mtime_ns for p in index.iterdir()}
    predict_ok(common + [f'--out_dir={tmp_path / "ngt2"}', '--nn=ngt', f'--cache_dir={tmp_path / "cache"}'], capsys)
    assert {p.name: p.stat().st_mtime_ns for p in index.iterdir()} == stamp      # reused, not rebuilt
    exact = [float(r['score']) for r in read_csv(tmp_path / 'exact' / 'predictions.csv')]
    for run in ('ngt', 'ngt2'):
        ngt = [float(r['score']) for r in read_csv(tmp_path / run / 'predictions.csv')]
        assert all(n >= e * (1 - 1e-6) for n, e in zip(ngt, exact))
    assert json.loads((tmp_path / 'ngt' / 'predictions.json').read_text())['model']['nn'] == 'ngt'


def png_of_zero_pixels() -> bytes:
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 0, 0, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))


def test_bad_images_are_skipped_with_their_error_and_exit_1(exported, tmp_path, capsys):
    folder = tmp_path / 'in'
    (folder / 'sub').mkdir(parents=True)
    good = exported['root'] / 'synthetic' / 'test' / 'good'
    shutil.copy(good / '000.png', folder / 'a_good.png')
    shutil.copy(good / '001.png', folder / 'sub' / 'z_good.PNG')          # recursive, any case of extension
    data = (good / '000.png').read_bytes()
    (folder / 'b_truncated.png').write_bytes(data[:300])
    (folder / 'c_corrupt.png').write_bytes(data[:100] + os.urandom(len(data) - 100))
    (folder / 'd_text.jpg').write_text('not a picture')
    (folder / 'e_empty.png').write_bytes(b'')
    (folder / 'f_zero_pixels.png').write_bytes(png_of_zero_pixels())
    (folder / 'g_unreadable.png').symlink_to(tmp_path / 'gone.png')       # a link to nothing: cannot be opened
    (folder / 'notes.txt').write_text('ignored: not an image name')
    out = tmp_path / 'out'
    _, err = exits(main_predict.main, ['--model', str(exported['model']), '--input', str(folder),
                                       f'--out_dir={out}', '--no_cache'], capsys, 1)
    rows = {Path(r['path']).name: r for r in read_csv(out / 'predictions.csv')}
    assert sorted(rows) == ['a_good.png', 'b_truncated.png', 'c_corrupt.png', 'd_text.jpg', 'e_empty.png',
                            'f_zero_pixels.png', 'g_unreadable.png', 'z_good.PNG']
    for name in ('a_good.png', 'z_good.PNG'):
        assert rows[name]['error'] == '' and rows[name]['decision'] == 'normal' and float(rows[name]['score']) > 0
    expected = {'b_truncated.png': 'truncated', 'c_corrupt.png': '', 'd_text.jpg': 'cannot identify image file',
                'e_empty.png': 'the file is empty (0 bytes)', 'f_zero_pixels.png': 'cannot identify image file',
                'g_unreadable.png': 'No such file or directory'}
    lines = err.strip().splitlines()
    for name, words in expected.items():
        row = rows[name]
        assert row['error'].startswith(f'cannot read image {folder / name}: ') and words in row['error']
        assert row['score'] == row['decision'] == row['anomalous_area'] == ''
        assert f'error: {row["error"]}' in lines
    assert lines[-1] == f'error: 6 of 8 images could not be read; see their rows in {out / "predictions.csv"}'
    assert len(lines) == 7
    summary = json.loads((out / 'predictions.json').read_text())
    assert summary['n_failed'] == 6 and sorted(p.name for p in (out / 'pictures').iterdir()) == ['a_good.png',
                                                                                                 'sub__z_good.png']
    assert '<h2>Failed</h2>' in (out / 'index.html').read_text()


@pytest.fixture
def bad_models(exported, tmp_path):
    """Model files that must be refused, each with the start of its message."""
    good = exported['model'].read_bytes()
    header_len = struct.unpack('<Q', good[:8])[0]
    models = {}

    def add(name: str, content: bytes, message: str) -> None:
        path = tmp_path / name
        path.write_bytes(content)
        models[name] = (path, message.format(path=path))

    add('truncated.safetensors', good[:len(good) // 2],
        '{path} is not a Patch SVDD model file, or it is truncated or damaged (')
    damaged = bytearray(good)
    damaged[8 + header_len + 1000] ^= 0xFF                               # one byte of the tensors flipped
    add('damaged.safetensors', bytes(damaged), 'model file {path} is damaged (checksum mismatch in ')
    add('junk.safetensors', os.urandom(5000), '{path} is not a Patch SVDD model file, or it is truncated or damaged (')
    add('checkpoint.pkl', exported['ckpt'].read_bytes(), '{path} is not a Patch SVDD model file, or it is truncated')
    add('other.safetensors', safetensors_bytes({'w': np.zeros(3, np.float32)}),
        '{path} is a safetensors file but not a Patch SVDD model (no "patchsvdd" metadata)')
    with safe_open(str(exported['model']), 'np') as f:
        meta = json.loads(f.metadata()['patchsvdd'])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    add('newer.safetensors', safetensors_bytes(tensors, {'patchsvdd': json.dumps({**meta, 'format_version': 99})}),
        'model file {path} has format version 99, newer than this program reads (2): update Patch SVDD')
    return models


@pytest.mark.parametrize('name', ['truncated.safetensors', 'damaged.safetensors', 'junk.safetensors',
                                  'checkpoint.pkl', 'other.safetensors', 'newer.safetensors'])
def test_bad_model_files_are_one_line_exit_2_nothing_written(name, bad_models, exported, tmp_path, capsys,
                                                             monkeypatch):
    path, message = bad_models[name]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / 'out'
    _, err = exits(main_predict.main, ['--model', str(path), '--input', str(exported['root']), f'--out_dir={out}',
                                       '--no_cache'], capsys, 2)
    assert err.startswith(f'error: {message}') and err.count('\n') == 1
    assert not out.exists()


def test_usage_errors_are_one_line_exit_2_nothing_written(exported, tmp_path, capsys, monkeypatch):
    work = tmp_path / 'work'
    work.mkdir()
    monkeypatch.chdir(work)
    model = str(exported['model'])
    image = str(exported['root'] / 'synthetic' / 'test' / 'good' / '000.png')
    empty = tmp_path / 'empty'
    (empty / 'deeper').mkdir(parents=True)
    (empty / 'deeper' / 'readme.txt').write_text('no images here')
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    cases = [
        (['--model', model, '--input', str(empty)], f'error: --input {empty}: no image files found (looked for .png'),
        (['--model', model, '--input', str(tmp_path / 'nowhere')], f'error: --input {tmp_path / "nowhere"}: no such file'),
        (['--model', model, '--input', str(tmp_path / '*.png')], f'error: --input {tmp_path / "*.png"}: no image files'),
        (['--model', str(tmp_path / 'missing.safetensors'), '--input', image],
         f'error: model file {tmp_path / "missing.safetensors"} not found: write one with main_export.py --out'),
        (['--model', model, '--input', image, '--D=32'],
         f'error: model file {model} has D=64 but --D 32 was given: drop --D or use a model of D=32'),
        (['--model', model, '--input', image, f'--out_dir={blocker}/out'],
         f'error: cannot create output folder {blocker}/out: Not a directory; choose another location'),
    ]
    for argv, message in cases:
        _, err = exits(main_predict.main, argv + ['--no_cache'], capsys, 2)
        assert err.startswith(message) and err.count('\n') == 1, (argv, err)
    assert list(work.iterdir()) == []
    # export: an unwritable place, and F1 asked of a class without defects
    for argv, message in [([f'--out={blocker}/m.safetensors'], f'error: cannot create model folder {blocker}: Not a '
                                                                 'directory'),
                          ([f'--out={work}'], f'error: --out {work} is a folder: give a file name')]:
        _, err = exits(main_export.main, exported['argv'][:-1] + argv, capsys, 2)
        assert err.startswith(message) and err.count('\n') == 1
    assert list(work.iterdir()) == []


def test_export_from_normal_images_only(exported, tmp_path, capsys):
    """A class without a test set: thresholds from the training images alone; asking for F1 is refused."""
    root = tmp_path / 'data'
    shutil.copytree(exported['root'] / 'synthetic' / 'train', root / 'normal_only' / 'train')
    base = ['--obj=normal_only', f'--data_root={root}', f'--ckpt={exported["ckpt"]}', '--nn=exact', '--no_cache']
    _, err = exits(main_export.main, base + ['--threshold_from=f1', f'--out={tmp_path / "m.safetensors"}'], capsys, 2)
    assert err.startswith('error: --threshold_from f1 needs defective test images') and not (tmp_path / 'm.safetensors').exists()
    main_export.main(base + ['--normal_quantile=0.5', f'--out={tmp_path / "m.safetensors"}'])
    out = capsys.readouterr().out
    model = model_file.load_model(tmp_path / 'm.safetensors')
    t = model.thresholds
    assert (t.image_source, t.pixel_source, t.f1_image, t.normal_quantile) == ('normal', 'normal', None, 0.5)
    # the median of the six leave-one-out training scores, recomputed here
    scores, _, _ = normal_scores(MemoryBank(model.mean, model.emb64, model.emb32), np.arange(6))
    assert t.image == pytest.approx(np.median(scores)) and t.pixel == t.image
    assert t.image_min == pytest.approx(scores.min()) and t.image_max == pytest.approx(scores.max())
    assert 'from normal' in out and '0 test images' in out


def test_predict_agrees_with_evaluate_on_real_bottle(mvtec_root, bottle_ckpt, tmp_path, capsys, monkeypatch):
    """Predict's raw score = the max of main_evaluate's mult map (--save_maps), with and without --model."""
    monkeypatch.chdir(tmp_path)
    bottle = mvtec_root / 'bottle'
    root = tmp_path / 'data'
    cls = root / 'bottle_few'
    picks = {'train/good': ['000', '050', '100', '150', '180', '200'], 'test/good': ['000'],
             'test/broken_large': ['000'], 'test/contamination': ['003']}
    for sub, stems in picks.items():
        (cls / sub).mkdir(parents=True)
        for stem in stems:
            (cls / sub / f'{stem}.png').symlink_to(bottle / sub / f'{stem}.png')
            if sub.startswith('test/') and not sub.endswith('good'):
                gt = cls / 'ground_truth' / sub.removeprefix('test/')
                gt.mkdir(parents=True, exist_ok=True)
                (gt / f'{stem}_mask.png').symlink_to(bottle / 'ground_truth' / sub.removeprefix('test/') / f'{stem}_mask.png')
    flags = ['--obj=bottle_few', f'--data_root={root}', f'--ckpt={bottle_ckpt}', '--nn=exact', '--device=cpu',
             f'--cache_dir={tmp_path / "cache"}']
    main_evaluate.main(flags + ['--save_maps', f'--results_dir={tmp_path / "results"}'])
    with np.load(next((tmp_path / 'results' / 'bottle_few').glob('*_maps.npz'))) as z:
        expected = dict(zip(z['test_paths'].tolist(), z['maps_mult'].max(axis=(1, 2)).tolist()))
    main_export.main(flags + [f'--out={tmp_path / "bottle_few.safetensors"}'])
    predict_ok(['--model', str(tmp_path / 'bottle_few.safetensors'), '--input', str(cls / 'test'),
                '--out_dir=with_model', '--no_pictures', '--no_cache'], capsys)
    # the data path's default search is evaluation's (exact), not NGT: no --nn here
    predict_ok([f for f in flags if f != '--nn=exact'] + ['--input', str(cls / 'test'), '--out_dir=from_flags',
                                                         '--no_pictures'], capsys)
    assert json.loads((tmp_path / 'from_flags' / 'predictions.json').read_text())['model']['nn'] == 'exact'
    for out in ('with_model', 'from_flags'):
        scores = {r['path']: float(r['score']) for r in read_csv(tmp_path / out / 'predictions.csv')}
        assert sorted(scores) == sorted(expected)
        for path, score in scores.items():
            assert score == pytest.approx(expected[path], rel=1e-6)
