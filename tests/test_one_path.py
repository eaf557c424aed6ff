"""Every method through one path: evaluate, export, load, predict and visualize give one image one score;
normal-only thresholds never score an image with a model that saw it; version-1 model files still load."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

import main_evaluate
import main_export
import main_predict
import main_visualize
from codes import model_file
from codes.backbones import Backbone, weights_sha256
from codes.checkpoints import save_module
from codes.methods.padim import PaDiM
from codes.methods.patchcore import PatchCore
from codes.methods.psdl import PSDL
from codes.model_file import crc32
from codes.networks import EncoderHier
from codes.prediction import Inspector

METHODS = ('patchsvdd', 'psdl', 'padim', 'patchcore')


def exits(main, argv, capsys, code: int) -> tuple[str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code
    out = capsys.readouterr()
    return out.out, out.err


@pytest.fixture(scope='module')
def work(synthetic_root, tmp_path_factory):
    """A folder with a random Patch SVDD encoder for the synthetic class, and a shared cache."""
    folder = tmp_path_factory.mktemp('one_path')
    torch.manual_seed(0)
    save_module(EncoderHier(64, 64), folder / 'ckpts' / 'synthetic' / 'enchier.pkl')
    return {'root': synthetic_root, 'dir': folder,
            'flags': ['--obj=synthetic', f'--data_root={synthetic_root}', f'--ckpt_dir={folder / "ckpts"}',
                      f'--cache_dir={folder / "cache"}', '--device=cpu']}


@pytest.fixture(scope='module')
def evaluated(work):
    """main_evaluate.py --method all --save_maps: each method's image scores as evaluation gives them."""
    results = work['dir'] / 'results'
    main_evaluate.main([*work['flags'], '--method=all', '--save_maps', f'--results_dir={results}'])
    scores = {}
    for npz in (results / 'synthetic').glob('*_maps.npz'):
        saved = np.load(npz)
        method = json.loads(npz.with_name(npz.name.replace('_maps.npz', '.json')).read_text()).get('method',
                                                                                                  'patchsvdd')
        scores[method] = {Path(p).parent.name + '/' + Path(p).name: s
                          for p, s in zip(saved['test_paths'], saved['image_scores'])}
    return scores


@pytest.fixture(scope='module')
def models(work, evaluated):
    out = {}
    for method in METHODS:
        out[method] = work['dir'] / 'models' / f'{method}.safetensors'
        main_export.main([*work['flags'], f'--method={method}', f'--out={out[method]}', '--normal_images=3'])
    return out


@pytest.mark.parametrize('method', METHODS)
def test_evaluate_export_load_predict_give_one_score(method, work, evaluated, models, tmp_path, capsys):
    with safe_open(str(models[method]), 'np') as f:      # any safetensors reader, no code run
        meta = json.loads(f.metadata()['patchsvdd'])
        names = set(f.keys())
    assert meta['format_version'] == 2 and meta['method'] == method
    assert meta['weights_sha256'] == weights_sha256({k[8:]: f_get(models[method], k) for k in names
                                                     if k.startswith('weights.')})
    if method != 'patchsvdd':
        # the layers the method uses, not layer4 or the classifier head
        assert not any(k.startswith(('weights._fc.', 'weights._conv_head.', 'weights._bn1.')) for k in names)
        assert meta['preprocessing'] == {'resize': meta['preprocessing']['resize'], 'size': 256, 'crop': 224}
        assert meta['info']['normal_scores'] and meta['info']['n_normal_scored'] == 3
    out = tmp_path / 'predicted'
    main_predict.main(['--model', str(models[method]), '--input', str(work['root'] / 'synthetic' / 'test'),
                       f'--out_dir={out}', '--no_pictures'])
    with (out / 'predictions.csv').open() as f:
        rows = list(csv.DictReader(f))
    got = {Path(r['path']).parent.name + '/' + Path(r['path']).name: float(r['score']) for r in rows}
    want = evaluated[method]
    assert set(got) == set(want) and len(got) == 6
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5), name
    # the Python API: the same objects, the same scores, paths and arrays alike
    image = work['root'] / 'synthetic' / 'test' / 'scratch' / '000.png'
    with Inspector(models[method], device='cpu') as inspector:
        from PIL import Image
        by_path, by_array = inspector.predict([image, np.asarray(Image.open(image).convert('RGB'))])
    assert by_path.score == pytest.approx(want['scratch/000.png'], rel=1e-5)
    assert by_array.score == pytest.approx(by_path.score, rel=1e-6)
    assert by_path.anomalous == (by_path.score >= inspector.thresholds.image)
    assert by_path.map.shape == ((256, 256) if method == 'patchsvdd' else (224, 224))


def f_get(path: Path, key: str) -> np.ndarray:
    with safe_open(str(path), 'np') as f:
        return f.get_tensor(key)


def test_summary_names_each_runs_network_in_its_own_column(work, evaluated):
    with (work['dir'] / 'results' / 'summary.csv').open() as f:
        rows = {r['method']: r for r in csv.DictReader(f)}
    assert set(rows) == set(METHODS)
    lite0 = Backbone('efficientnet_lite0').sha256
    for method in METHODS[1:]:       # the backbone's SHA-256, not in the checkpoint's column
        assert rows[method]['backbone_sha256'] == lite0 and rows[method]['checkpoint_sha256'] == ''
    assert rows['patchsvdd']['checkpoint_sha256'] and rows['patchsvdd']['backbone_sha256'] == ''


def test_evaluate_all_ends_with_one_table_and_skips_patchsvdd_without_checkpoint(work, tmp_path, capsys):
    flags = [f for f in work['flags'] if not f.startswith('--ckpt_dir')] + [f'--ckpt_dir={tmp_path / "none"}']
    main_evaluate.main([*flags, '--method=all', f'--results_dir={tmp_path / "r"}'])
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith('skipped patchsvdd: ') for line in out) == 1
    table = out[out.index('| class | method | Det | Seg | AUPRO | pixel AP | F1-max | time (s) |'):]
    assert [row.split('|')[2].strip() for row in table[2:5]] == ['psdl', 'padim', 'patchcore']
    assert all(float(row.split('|')[-2]) > 0 for row in table[2:])


def test_visualize_all_draws_one_panel_per_image_and_lists_every_score(work, evaluated, tmp_path, capsys):
    out = tmp_path / 'maps'
    main_visualize.main([*work['flags'], '--method=all', f'--out_dir={out}'])
    panels = sorted(out.glob('*.png'))
    assert len(panels) == 6
    page = (out / 'index.html').read_text()
    rows = re.findall(r'<tr class="(?:normal|defective)"><td><a href="[^"]+">([^<]+)</a></td><td>[^<]*</td>(.*?)</tr>',
                      page)
    assert len(rows) == 6
    for name, cells in rows:
        values = [float(v) for v in re.findall(r'<td>([^<]+)</td>', cells)]
        assert values == pytest.approx([evaluated[m][name] for m in METHODS], rel=1e-3)
    # ranked by the first method's (Patch SVDD's) score
    first = [float(re.findall(r'<td>([^<]+)</td>', cells)[0]) for _, cells in rows]
    assert first == sorted(first, reverse=True)


def test_visualize_patchcore_ranks_by_its_reweighted_score(work, evaluated, tmp_path):
    out = tmp_path / 'maps'
    main_visualize.main([*work['flags'], '--method=patchcore', f'--out_dir={out}'])
    page = (out / 'index.html').read_text()
    assert '<title>PatchCore: synthetic</title>' in page
    listed = [float(s) for s in re.findall(r'&middot; score ([-\d.e+]+)</figcaption>', page)]
    want = sorted(evaluated['patchcore'].values(), reverse=True)
    assert listed == pytest.approx(want, rel=1e-3)
    # the re-weighted score is not the map's maximum here (the test would not tell them apart otherwise)
    maps = np.load(next((work['dir'] / 'results' / 'synthetic').glob('*patchcore*_maps.npz')))
    assert not np.allclose(maps['maps_patchcore'].max(axis=(1, 2)), maps['image_scores'], rtol=1e-3)


def test_visualize_several_classes_visits_each(work, tmp_path, capsys):
    flags = [f for f in work['flags'] if not f.startswith('--obj')]
    main_visualize.main([*flags, '--obj=synthetic,zipper', '--method=padim', f'--out_dir={tmp_path / "maps"}'])
    assert (tmp_path / 'maps' / 'synthetic' / 'index.html').is_file()
    out = capsys.readouterr().out
    assert 'not found under the data root, skipped: zipper' in out and '== synthetic' in out


def features(n: int, seed: int, channels=(3, 4, 5)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {'layer1': torch.randn(n, channels[0], 8, 8, generator=g),
            'layer2': torch.randn(n, channels[1], 4, 4, generator=g),
            'layer3': torch.randn(n, channels[2], 2, 2, generator=g)}


def test_padim_held_out_equals_a_refit_without_the_image():
    train = features(12, 0)
    padim = PaDiM((3, 4, 5), 8, image_size=16)
    padim.load_state(padim.fit(train))
    which = np.array([0, 5, 11])
    held, _ = padim.held_out(lambda idx: {k: v[idx] for k, v in train.items()}, which, 12)
    seen = padim.score({k: v[which] for k, v in train.items()})[0]
    for row, i in enumerate(which):
        refit = PaDiM((3, 4, 5), 8, image_size=16)
        keep = np.setdiff1d(np.arange(12), [i])
        refit.load_state(refit.fit({k: v[keep] for k, v in train.items()}))
        want = refit.score({k: v[[i]] for k, v in train.items()})[0][0]
        np.testing.assert_allclose(held[row], want, rtol=2e-4, atol=1e-5)
    assert (held.max(axis=(1, 2)) > seen.max(axis=(1, 2))).all()     # scored by a model that saw it: lower


def test_patchcore_held_out_excludes_the_images_own_coreset_rows():
    train = features(6, 1, (8, 8, 8))
    core = PatchCore(1.0, image_size=16)               # every training patch in the coreset
    core.load_state(core.fit(train))
    which = np.array([1, 4])
    maps, scores = core.held_out(lambda idx: {k: v[idx] for k, v in train.items()}, which, 6)
    seen_maps, _ = core.score({k: v[which] for k, v in train.items()})
    assert np.allclose(seen_maps, 0, atol=1e-3)       # the fitted model holds these very patches
    assert (maps.max(axis=(1, 2)) > 0.1).all()
    for row, i in enumerate(which):                    # = a coreset without the image's rows
        per_image = len(core.selected) // 6
        other = PatchCore(1.0, image_size=16)
        keep = core.selected // per_image != i
        other.load_state({'coreset': core.coreset[keep], 'selected': core.selected[keep]})
        want_maps, want_scores = other.score({k: v[[i]] for k, v in train.items()})
        np.testing.assert_allclose(maps[row], want_maps[0], rtol=1e-6)
        np.testing.assert_allclose(scores[row], want_scores[0], rtol=1e-6)


def test_psdl_held_out_folds_are_scored_by_a_refit_without_them():
    train = features(10, 2, (16, 16, 16))
    psdl = PSDL((16, 16, 16), 'single', 'layer3', iterations=2, image_size=16)
    psdl.load_state(psdl.fit(train))
    which = np.array([0, 3])          # one fold (at most a fifth of 10 = 2 images)
    held, _ = psdl.held_out(lambda idx: {k: v[idx] for k, v in train.items()}, which, 10)
    refit = PSDL((16, 16, 16), 'single', 'layer3', iterations=2, image_size=16)
    keep = np.setdiff1d(np.arange(10), which)
    refit.load_state(refit.fit({k: v[keep] for k, v in train.items()}))
    np.testing.assert_allclose(held, refit.score({k: v[which] for k, v in train.items()})[0], rtol=1e-6)
    seen = psdl.score({k: v[which] for k, v in train.items()})[0]
    assert not np.allclose(held, seen, rtol=1e-3)


def test_version_1_patchsvdd_model_file_still_loads(models, work, tmp_path, capsys):
    """A version-1 file, laid out as the version-1 writer did (encoder.*, mean, emb64, emb32, D / resize / nn
    at the top of the metadata), loads and predicts the scores of the version-2 file."""
    with safe_open(str(models['patchsvdd']), 'np') as f:
        meta = json.loads(f.metadata()['patchsvdd'])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    v1 = {('encoder.' + k[8:] if k.startswith('weights.') else k[6:] if k.startswith('state.') else k): v
          for k, v in tensors.items()}
    info = {k: v for k, v in meta['info'].items() if k != 'normal_scores'}
    v1_meta = {'format': 'patchsvdd-model', 'format_version': 1, 'D': 64, 'resize': 'nearest', 'nn': 'exact',
               'thresholds': meta['thresholds'], 'info': info, 'crc32': {k: crc32(v) for k, v in v1.items()}}
    path = tmp_path / 'v1.safetensors'
    path.write_bytes(safetensors_bytes(v1, metadata={'patchsvdd': json.dumps(v1_meta)}))
    old, new = model_file.load_model(path), model_file.load_model(models['patchsvdd'])
    assert old.method == new.method == "patchsvdd" and (old.D, old.resize, old.nn) == (64, "nearest", "exact")
    assert old.thresholds == new.thresholds and all(np.array_equal(old.state[k], new.state[k]) for k in new.state)
    image = work['root'] / 'synthetic' / 'test' / 'spot'
    scores = []
    for model in (path, models['patchsvdd']):
        with Inspector(model, device='cpu') as inspector:
            scores.append([r.score for r in inspector.predict(sorted(image.glob('*.png')))])
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)


def test_model_errors_are_one_line_exit_2_nothing_written(models, work, tmp_path, capsys):
    out = tmp_path / 'out'
    test = str(work['root'] / 'synthetic' / 'test')
    cases = [(['--model', str(models['patchcore']), '--method=padim'],
              f"error: --method padim but {models['patchcore']} holds a patchcore model: drop --method"),
             (['--model', str(models['padim']), '--coreset_ratio=0.1'],
              f"error: --coreset_ratio is fixed by the model file {models['padim']} (a padim model)")]
    # a model whose backbone weights were changed after export (its CRCs made to fit): the SHA-256 says so
    with safe_open(str(models['padim']), 'np') as f:
        meta = json.loads(f.metadata()['patchsvdd'])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.startswith('weights.') and tensors[k].dtype == np.float32)
    tensors[key] = tensors[key] + np.float32(0.5)
    meta['crc32'] = {k: crc32(v) for k, v in tensors.items()}
    tampered = tmp_path / 'tampered.safetensors'
    tampered.write_bytes(safetensors_bytes(tensors, metadata={'patchsvdd': json.dumps(meta)}))
    cases.append((['--model', str(tampered)], f"error: model file {tampered}: its network weights' SHA-256"))
    for extra, message in cases:
        _, err = exits(main_predict.main, [*extra, '--input', test, f'--out_dir={out}'], capsys, 2)
        assert err.startswith(message) and err.count('\n') == 1, err
        assert not out.exists()
    _, err = exits(main_export.main, [*work['flags'], '--method=svm', f'--out={tmp_path / "m.safetensors"}'],
                   capsys, 2)
    assert err.startswith("error: argument --method: invalid choice: 'svm'") and err.count('\n') == 1
    _, err = exits(main_evaluate.main, [*work['flags'], '--method=psdl,svm'], capsys, 2)
    assert err.startswith("error: argument --method: 'svm' is not a method") and err.count('\n') == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ['tampered.safetensors']


def test_backbone_from_model_weights_gives_the_same_features(models, synthetic_root):
    model = model_file.load_model(models['padim'])
    rebuilt = Backbone.from_weights(model.settings['backbone'], model.weights, model.settings['backbone_sha256'])
    full = Backbone(model.settings['backbone'])
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    a, b = rebuilt.features(images), full.features(images)
    assert all(torch.equal(a[k], b[k]) for k in a)


def python_api_examples():
    """The Python blocks of README.md and docs/prediction.md that use Inspector."""
    for name in ('README.md', 'docs/prediction.md'):
        text = (Path(__file__).resolve().parents[1] / name).read_text()
        for block in re.findall(r'```python\n(.*?)```', text, re.S):
            if 'Inspector(' in block:
                yield pytest.param(block, id=name)


@pytest.mark.parametrize('block', list(python_api_examples()))
def test_documented_python_api_examples_run(block, models, work, capsys):
    """Each documented example, run as written with this test's PatchCore model and synthetic images in place
    of bottle's: the image paths it names become a normal and a defective test image."""
    test = work['root'] / 'synthetic' / 'test'
    code = block.replace("'bottle-patchcore.safetensors'", repr(str(models['patchcore'])))
    code = code.replace("'../shared/data/mvtec/bottle/test/'", repr(str(test) + '/'))
    code = code.replace("'broken_large/000.png'", "'scratch/000.png'")
    for path, real in zip(re.findall(r"'(new_images/[^']+)'", code), ('good/000.png', 'scratch/000.png')):
        code = code.replace(repr(path), repr(str(test / real)))
    assert str(models['patchcore']) in code and 'bottle' not in code
    exec(compile(code, 'example', 'exec'), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and all(line.strip() for line in lines)
