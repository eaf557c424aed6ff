"""main_serve.py's service, in-process (Starlette's TestClient runs the app and its lifespan) and once as
real uvicorn worker processes: every route, the same numbers as main_predict.py, bad uploads, the token
rule, a full queue, batching, and several models by name."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import io
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import main_export
import main_predict
import main_serve
from codes import model_file
from codes.checkpoints import save_module
from codes.networks import EncoderHier
from codes.service import batching
from codes.service.app import Settings, create_app
from codes.service.scoring import open_scorer

REPO = Path(__file__).resolve().parents[1]


def export_model(root: Path, work: Path, seed: int, name: str) -> Path:
    torch.manual_seed(seed)
    ckpt = work / f'enc{seed}.pkl'
    save_module(EncoderHier(64, 64), ckpt)
    out = work / f'{name}.safetensors'
    main_export.main(['--obj=synthetic', f'--data_root={root}', f'--ckpt={ckpt}', '--nn=exact', '--device=cpu',
                      f'--cache_dir={work / "cache"}', f'--out={out}'])
    return out


@pytest.fixture(scope='module')
def models(synthetic_root, tmp_path_factory) -> dict:
    """Two models of the synthetic class (different random encoders), as main_export.py writes them."""
    work = tmp_path_factory.mktemp('serve')
    return {'root': synthetic_root, 'work': work, 'a': export_model(synthetic_root, work, 0, 'a'),
            'b': export_model(synthetic_root, work, 1, 'b')}


@pytest.fixture(scope='module')
def test_images(models) -> list[Path]:
    return sorted((models['root'] / 'synthetic' / 'test').rglob('*.png'))


@pytest.fixture(scope='module')
def predicted(models, tmp_path_factory) -> dict[str, dict]:
    """main_predict.py's rows (and picture files) for model a, by file name relative to test/."""
    out = tmp_path_factory.mktemp('predict_out')
    test_dir = models['root'] / 'synthetic' / 'test'
    main_predict.main(['--model', str(models['a']), '--input', str(test_dir), f'--out_dir={out}', '--no_cache',
                       '--save_maps=npy'])
    with (out / 'predictions.csv').open() as f:
        rows = list(csv.DictReader(f))
    found = {}
    for r in rows:
        stem = '__'.join(Path(r['path']).relative_to(test_dir).with_suffix('').parts)
        found[str(Path(r['path']).relative_to(test_dir))] = {
            **r, 'picture': np.asarray(Image.open(out / 'pictures' / f'{stem}.png')),
            'map': np.load(out / 'maps' / f'{stem}.npy')}
    return found


@contextlib.contextmanager
def serving(paths: dict[str, Path], open_model=open_scorer, **settings):
    app = create_app(Settings(models=[(n, str(p)) for n, p in paths.items()], **settings), open_model)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope='module')
def client(models):
    with serving({'a': models['a']}, max_upload_mb=0.5, max_pixels=200_000, max_files=4) as c:
        yield c


def png_bytes(array: np.ndarray, fmt: str = 'PNG') -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def decode_b64_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def assert_row_matches(row: dict, expected: dict) -> None:
    assert row['score'] == pytest.approx(float(expected['score']), rel=1e-6)
    assert row['normalized_score'] == pytest.approx(float(expected['normalized_score']), rel=1e-6, abs=1e-12)
    assert row['decision'] == expected['decision']
    assert row['anomalous_area'] == pytest.approx(float(expected['anomalous_area']), rel=1e-6, abs=1e-12)
    assert row['error'] is None


def test_health_models_and_page(client, models):
    assert client.get('/health').json() == {'status': 'ready', 'models': ['a']}
    described = client.get('/models').json()['models']
    loaded = model_file.load_model(models['a'])
    assert [m['name'] for m in described] == ['a']
    m = described[0]
    assert m['method'] == 'patchsvdd' and m['file'] == 'a.safetensors'
    assert m['settings'] == {'D': loaded.D, 'nn': loaded.nn, 'resize': loaded.resize, 'size': 256, 'crop': None}
    assert m['thresholds'] == loaded.thresholds.to_dict()
    assert m['provenance']['checkpoint_sha256'] == loaded.info['checkpoint_sha256']
    assert str(models['work']) not in str(described)        # no server paths
    page = client.get('/')
    assert page.status_code == 200 and page.headers['content-type'].startswith('text/html')
    # self-contained: no external scripts, styles or fonts
    assert '<script src' not in page.text and 'http://' not in page.text and 'https://' not in page.text
    assert '<link' not in page.text and 'predict?map=png' in page.text


def test_multipart_scores_maps_and_overlays_equal_main_predict(client, predicted, test_images, models):
    root = models['root'] / 'synthetic' / 'test'
    names = [str(p.relative_to(root)) for p in test_images][:4]
    files = [('files', (n, (root / n).read_bytes(), 'image/png')) for n in names]
    r = client.post('/predict?map=png&map=npy', files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body['model'] == 'a' and body['thresholds'] == model_file.load_model(models['a']).thresholds.to_dict()
    assert [row['filename'] for row in body['images']] == names
    for name, row in zip(names, body['images']):
        expected = predicted[name]
        assert_row_matches(row, expected)
        raw = np.load(io.BytesIO(base64.b64decode(row['map_npy'])), allow_pickle=False)
        assert raw.dtype == np.float32 and raw.shape == (256, 256)
        np.testing.assert_allclose(raw, expected['map'], rtol=1e-6, atol=1e-7)
        assert np.array_equal(decode_b64_png(row['overlay_png']), expected['picture'])   # main_predict's picture


def test_raw_body_and_every_test_image_one_per_request(client, predicted, test_images, models):
    root = models['root'] / 'synthetic' / 'test'
    for path in test_images:
        r = client.post('/models/a/predict', content=path.read_bytes(), headers={'content-type': 'image/png'})
        assert r.status_code == 200, r.text
        row = r.json()['images'][0]
        assert_row_matches(row, predicted[str(path.relative_to(root))])
        assert 'overlay_png' not in row and 'map_npy' not in row


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (its data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 16)) + chunk(b'IEND', b'')


def bad_requests(good: bytes) -> list[tuple[str, dict, int, str]]:
    """(what, request keyword arguments, expected status, words the error must contain)."""
    rgb = np.zeros((40, 40, 3), np.uint8)
    return [
        ('over --max_upload_mb', {'content': b'\0' * 600_000, 'headers': {'content-type': 'image/png'}}, 413, 'MB'),
        ('over --max_upload_mb, multipart', {'files': [('f', ('x.png', b'\0' * 600_000, 'image/png'))]}, 413, 'MB'),
        ('over --max_pixels', {'content': png_bytes(np.zeros((500, 500, 3), np.uint8))}, 413, 'pixels'),
        ('decompression bomb', {'content': bomb_png(100_000, 100_000)}, 413, '10000000000 pixels'),
        ('bomb under PIL\'s own limit', {'content': bomb_png(10_000, 10_000)}, 413, '10000x10000'),
        ('not an image', {'files': [('f', ('notes.png', b'just some text', 'image/png'))]}, 422, 'notes.png'),
        ('truncated', {'files': [('f', ('cut.png', good[:len(good) // 2], 'image/png'))]}, 422, 'cut.png'),
        ('empty', {'files': [('f', ('empty.png', b'', 'image/png'))]}, 422, 'empty'),
        ('empty body', {'content': b'', 'headers': {'content-type': 'image/png'}}, 422, 'empty'),
        ('content type', {'content': good, 'headers': {'content-type': 'text/plain'}}, 415, 'text/plain'),
        ('part content type', {'files': [('f', ('a.txt', good, 'text/plain'))]}, 415, 'a.txt'),
        ('GIF format', {'content': png_bytes(rgb[..., 0], 'GIF')}, 415, 'GIF'),
        ('no files', {'files': {'field': (None, 'value')}}, 400, 'no image'),       # multipart, a text field only
        ('a form', {'data': {'field': 'value'}}, 415, 'x-www-form-urlencoded'),
        ('too many files', {'files': [('f', (f'{i}.png', good, 'image/png')) for i in range(6)]}, 413, '--max_files'),
        ('bad map value', {'content': good, 'params': {'map': 'jpeg'}}, 400, 'jpeg'),
        ('unknown query', {'content': good, 'params': {'path': '/etc/passwd'}}, 400, 'path'),
    ]


@pytest.mark.parametrize('case', range(len(bad_requests(b''))))
def test_each_bad_upload_is_a_4xx_json_and_the_next_request_works(client, test_images, case):
    good = test_images[0].read_bytes()
    what, kwargs, status, words = bad_requests(good)[case]
    r = client.post('/predict', **kwargs)
    assert r.status_code == status, (what, r.text)
    assert set(r.json()) == {'error'} and words in r.json()['error'], what
    assert 'Traceback' not in r.text
    after = client.post('/predict', content=good, headers={'content-type': 'image/png'})
    assert after.status_code == 200 and after.json()['images'][0]['error'] is None


def test_unknown_model_route_and_method(client, test_images):
    good = test_images[0].read_bytes()
    r = client.post('/models/nope/predict', content=good)
    assert r.status_code == 404 and "'nope'" in r.json()['error'] and 'a' in r.json()['error']
    assert client.get('/nothing').status_code == 404 and 'error' in client.get('/nothing').json()
    assert client.get('/predict').status_code == 405 and 'error' in client.get('/predict').json()


def test_token_rule(models, test_images):
    good = test_images[0].read_bytes()
    with serving({'a': models['a']}, token='s3cret') as c:
        assert c.get('/health').status_code == 200                 # a load balancer's probe needs no token
        for auth in (None, 'Bearer wrong', 'Basic s3cret', 's3cret'):
            headers = {'authorization': auth} if auth else {}
            for r in (c.get('/', headers=headers), c.get('/models', headers=headers),
                      c.post('/predict', content=good, headers=headers)):
                assert r.status_code == 401 and 'token' in r.json()['error'] and r.headers['www-authenticate'] == 'Bearer'
        ok = {'authorization': 'Bearer s3cret'}
        assert c.get('/', headers=ok).status_code == 200 and c.get('/models', headers=ok).status_code == 200
        assert c.post('/predict', content=good, headers=ok).status_code == 200


def test_non_loopback_host_needs_a_token_or_insecure(models, capsys, monkeypatch):
    monkeypatch.delenv(main_serve.TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as info:
        main_serve.main(['--model', str(models['a']), '--host', '0.0.0.0'])
    assert info.value.code == 2 and '--token' in capsys.readouterr().err
    for extra in (['--token', 't'], ['--insecure']):
        args = main_serve.parse_args(['--model', str(models['a']), '--host', '0.0.0.0', *extra])
        assert main_serve.check_args(args).token == ('t' if extra[0] == '--token' else None)
    assert main_serve.is_loopback('127.0.0.1') and main_serve.is_loopback('::1') and not main_serve.is_loopback('10.0.0.1')
    with pytest.raises(SystemExit) as info:             # an unreadable model file: one line, exit 2
        main_serve.main(['--model', str(models['work'] / 'missing.safetensors')])
    assert info.value.code == 2 and 'not found' in capsys.readouterr().err


class BlockedScorer:
    """Wraps a scorer: records each batch's size and holds the first batch until released."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, images):
        self.batches.append(len(images))
        self.entered.set()
        assert self.release.wait(60)
        return self.inner.score(images)


def test_queue_full_is_503_and_waiting_requests_are_batched(models, predicted, test_images):
    root = models['root'] / 'synthetic' / 'test'
    held = {}

    @contextlib.contextmanager
    def blocked(*args):
        with open_scorer(*args) as s:
            held['scorer'] = BlockedScorer(s)
            yield held['scorer']

    with serving({'a': models['a']}, blocked, max_batch=8, max_wait_ms=0, max_queue=3) as c:
        scorer, queue = held['scorer'], c.app.state.queues['a']
        answers = {}

        def send(k: int, path: Path) -> None:
            answers[k] = (path, c.post('/predict', content=path.read_bytes()))

        threads = [threading.Thread(target=send, args=(0, test_images[0]))]
        threads[0].start()
        assert scorer.entered.wait(30)                   # the worker holds request 0
        for k in range(1, 4):
            threads.append(threading.Thread(target=send, args=(k, test_images[k % len(test_images)])))
            threads[-1].start()
        deadline = time.monotonic() + 30
        while queue.waiting() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue.waiting() == 3
        full = c.post('/predict', content=test_images[0].read_bytes())
        assert full.status_code == 503 and full.headers['retry-after'] == '1' and 'busy' in full.json()['error']
        scorer.release.set()
        for t in threads:
            t.join(60)
        assert scorer.batches == [1, 3]                  # the three waiting requests were scored together
        for path, r in answers.values():
            assert r.status_code == 200
            assert_row_matches(r.json()['images'][0], predicted[str(path.relative_to(root))])
        assert c.post('/predict', content=test_images[0].read_bytes()).status_code == 200


def test_a_batch_waits_for_requests_still_arriving(monkeypatch):
    # clients answered together send again together, but their images are decoded one after another: the
    # batch being gathered waits for requests already received (not for ones that never come, nor forever)
    monkeypatch.setattr(batching, 'ARRIVING_WAIT_S', 0.3)
    sizes = []

    def score(images):
        sizes.append(len(images))
        return list(images[:, 0])

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            queue = batching.BatchQueue(score, executor, max_batch=8, max_wait_s=0, max_queue=8)
            queue.start()
            with queue.arriving():                       # a second request still being decoded
                first = queue.put(np.full((1, 1), 1.0))
                await asyncio.sleep(0.1)                 # longer than --max_wait_ms, shorter than the cap
                second = queue.put(np.full((1, 1), 2.0))
            assert await first == [1.0] and await second == [2.0]
            with queue.arriving():                       # a request that fails while being read: no put
                third = queue.put(np.full((1, 1), 3.0))
                await asyncio.sleep(0.05)
            assert await third == [3.0]
            with queue.arriving():                       # one that takes longer than the cap
                fourth = queue.put(np.full((1, 1), 4.0))
                assert await fourth == [4.0]
            await queue.stop()

    asyncio.run(scenario())
    assert sizes == [2, 1, 1]


def test_several_models_by_name(models, test_images):
    good = test_images[-1].read_bytes()
    with serving({'a': models['a'], 'b': models['b']}) as c:
        assert [m['name'] for m in c.get('/models').json()['models']] == ['a', 'b']
        r = c.post('/predict', content=good)
        assert r.status_code == 400 and '/models/{name}/predict' in r.json()['error']
        for name in ('a', 'b'):
            row = c.post(f'/models/{name}/predict', content=good).json()['images'][0]
            with open_scorer(name, models[name]) as s:      # each model scored on its own
                from codes.mvtecad import load_image
                alone = s.score(load_image(test_images[-1], s.model.resize)[None])[0]
            assert row['score'] == pytest.approx(alone.score, rel=1e-6)
        scores = [c.post(f'/models/{n}/predict', content=good).json()['images'][0]['score'] for n in ('a', 'b')]
        assert scores[0] != pytest.approx(scores[1], rel=1e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def served(models) -> str:
    """main_serve.py as a user starts it, with 2 uvicorn worker processes; its URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO / 'main_serve.py'), '--model', f'a={models["a"]}',
                               '--port', str(port), '--workers', '2', '--log_level', 'warning'],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f'{url}/health', timeout=2).status_code == 200:
                    break
            assert server.poll() is None, server.stdout.read().decode()
            time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def test_main_serve_with_two_worker_processes(served, test_images, predicted, models):
    root = models['root'] / 'synthetic' / 'test'
    for path in test_images[:4]:
        r = httpx.post(f'{served}/predict', content=path.read_bytes(), timeout=60)
        assert_row_matches(r.json()['images'][0], predicted[str(path.relative_to(root))])


def chromium() -> tuple[str, str]:
    """Debian's chromium and chromium-driver; missing, the test is skipped (a failure under .ci/run)."""
    found = shutil.which('chromium') or shutil.which('chromium-browser'), shutil.which('chromedriver')
    if None in found:
        message = 'the page test needs Chromium: apt-get install chromium chromium-driver'
        if os.environ.get('PATCHSVDD_REQUIRE_ALL'):
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_the_page_in_a_browser_shows_each_dropped_image_newest_first(served, test_images, predicted, models):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=900,1200'):
        options.add_argument(flag)
    root = models['root'] / 'synthetic' / 'test'
    chosen = [test_images[0], test_images[-1]]
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(served + '/')
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, 'model').get_attribute('value') == 'a')
        assert 'patchsvdd' in driver.find_element(By.ID, 'info').text
        upload = driver.find_element(By.ID, 'files')
        for n, path in enumerate(chosen, 1):          # as a user picks one file, then another
            upload.send_keys(str(path))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#results figure')) == n)
        cards = driver.find_elements(By.CSS_SELECTOR, '#results figure')
        for card, path in zip(cards, reversed(chosen)):       # newest first
            expected = predicted[str(path.relative_to(root))]
            assert card.get_attribute('class') == expected['decision']
            caption = card.find_element(By.TAG_NAME, 'figcaption').text
            shown = float(re.search(r'score (\S+) ', caption).group(1))          # 5 significant digits
            assert path.name in caption and shown == pytest.approx(float(expected['score']), rel=1e-4)
            picture = card.find_element(By.TAG_NAME, 'img').get_attribute('src')
            assert np.array_equal(decode_b64_png(picture.split(',', 1)[1]), expected['picture'])
        assert driver.find_element(By.ID, 'status').text == '2 image(s) scored'
        if os.environ.get('PATCHSVDD_SCREENSHOT'):       # docs/images/serve_page.png is taken this way
            driver.save_screenshot(os.environ['PATCHSVDD_SCREENSHOT'])
    finally:
        driver.quit()
