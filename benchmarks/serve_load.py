"""The inspection service under load, beside main_predict.py on the same images in the same run.

    python benchmarks/serve_load.py [--model FILE] [--clients 8] [--requests 1000] [--max_batch 16]
                                    [--max_wait_ms 2] [--workers 1] [--obj bottle] [--data_root ...] [--ckpt ...]

1. Without an existing --model, exports the class's Patch SVDD model first (main_export.py, 4 training
   images scored leave-one-out for the normalisation, so that the export stays short).
2. `main_predict.py --model FILE --no_pictures` over the class's test images: its predict loop's images/s
   and seconds per image (the loop's own time, from predictions.json's times_s).
3. `main_serve.py --model FILE` on a free loopback port, then:
   - single: one client, one image per request, one request at a time (the idle latency);
   - load: --clients concurrent clients sending the test images (read into memory first) one per request
     until --requests have been answered: images/s, p50/p95/p99 latency, errors, and the server's RSS
     (its processes together) after 100 requests and at the end.
   Every answer's score is checked against main_predict.py's for the same image (relative 1e-6).
"""
from __future__ import annotations

import csv
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from common import REPO, checkpoint_path, class_parser  # noqa: E402  (puts the repository on the path)
from codes.mvtecad import find_class  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn's workers), from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f'/proc/{p}/status').read_text()
            children = Path(f'/proc/{p}/task/{p}/children').read_text().split()
        except OSError:
            continue
        total += int(next(line.split()[1] for line in status.splitlines() if line.startswith('VmRSS:')))
        todo += [int(c) for c in children]
    return total / 1024


def run(argv: list[str]) -> str:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f'{" ".join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}')
    return proc.stdout


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = class_parser(__doc__)
    parser.add_argument('--model', default=None, help='model file; exported there first if missing (default: temporary)')
    parser.add_argument('--clients', type=int, default=8)
    parser.add_argument('--requests', type=int, default=1000)
    parser.add_argument('--single', type=int, default=30, help='one-at-a-time requests for the idle latency')
    parser.add_argument('--max_batch', type=int, default=16)
    parser.add_argument('--max_wait_ms', type=float, default=2.0)
    parser.add_argument('--workers', type=int, default=1)
    args = parser.parse_args()
    paths = find_class(Path(args.data_root), args.obj).test
    bodies = [p.read_bytes() for p in paths]

    with tempfile.TemporaryDirectory(prefix='serve-load-') as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else tmp / f'{args.obj}.safetensors'
        if not model.exists():
            run([str(REPO / 'main_export.py'), f'--obj={args.obj}', f'--data_root={args.data_root}',
                 f'--ckpt={checkpoint_path(args)}', f'--resize={args.resize}', '--normal_images=4',
                 f'--cache_dir={tmp / "cache"}', '--device=cpu', f'--out={model}'])

        run([str(REPO / 'main_predict.py'), '--model', str(model), '--input', *map(str, paths), '--no_pictures',
             f'--out_dir={tmp / "out"}', f'--cache_dir={tmp / "cache"}', '--device=cpu'])
        loop_s = json.loads((tmp / 'out' / 'predictions.json').read_text())['times_s']['predict']
        with (tmp / 'out' / 'predictions.csv').open() as f:
            expected = {Path(r['path']): float(r['score']) for r in csv.DictReader(f)}
        expected = [expected[p.resolve()] if p.resolve() in expected else expected[p] for p in paths]
        predict_rate, predict_per_image = len(paths) / loop_s, loop_s / len(paths)

        port = free_port()
        server = subprocess.Popen([sys.executable, str(REPO / 'main_serve.py'), '--model', str(model),
                                   '--port', str(port), '--workers', str(args.workers), '--log_level', 'warning',
                                   f'--max_batch={args.max_batch}', f'--max_wait_ms={args.max_wait_ms}',
                                   '--max_queue=1024', '--device=cpu'], cwd=REPO)
        url = f'http://127.0.0.1:{port}/predict'
        mismatches = []

        def check(i: int, response: httpx.Response) -> bool:
            if response.status_code != 200:
                return False
            score = response.json()['images'][0]['score']
            if abs(score - expected[i]) > 1e-6 * abs(expected[i]):
                mismatches.append((paths[i].name, score, expected[i]))
            return True

        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f'http://127.0.0.1:{port}/health', timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit('main_serve.py did not become ready')
                time.sleep(0.2)

            with httpx.Client(timeout=120) as client:
                for i in range(4):                    # warm-up: first-call costs are not latency
                    check(i, client.post(url, content=bodies[i]))
                single = []
                for n in range(args.single):
                    i = n % len(bodies)
                    started = time.perf_counter()
                    r = client.post(url, content=bodies[i])
                    single.append(time.perf_counter() - started)
                    check(i, r)

            latencies, errors, counter, lock = [], [0], [0], threading.Lock()
            rss_100 = [None]

            def client_loop() -> None:
                with httpx.Client(timeout=120) as client:
                    while True:
                        with lock:
                            n = counter[0]
                            if n >= args.requests:
                                return
                            counter[0] += 1
                        i = n % len(bodies)
                        started = time.perf_counter()
                        try:
                            ok = check(i, client.post(url, content=bodies[i]))
                        except httpx.HTTPError:
                            ok = False
                        with lock:
                            latencies.append(time.perf_counter() - started)
                            errors[0] += not ok
                            if len(latencies) == 100:
                                rss_100[0] = rss_mb(server.pid)

            threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - started
            rss_end = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(30)

    rate = len(latencies) / wall
    single_median = statistics.median(single)
    print(f'## {args.obj}: main_serve.py under load ({args.clients} clients, {args.requests} requests, '
          f'--max_batch {args.max_batch} --max_wait_ms {args.max_wait_ms:g} --workers {args.workers}) '
          f'beside main_predict.py --no_pictures, {len(paths)} test images\n')
    print('| measure | value | target |')
    print('|---|---|---|')
    print(f'| main_predict.py predict loop | {predict_rate:.2f} images/s ({1000 * predict_per_image:.0f} ms/image) | |')
    print(f'| service under load | {rate:.2f} images/s = {rate / predict_rate:.0%} of main_predict | >= 90% |')
    print(f'| latency under load p50 / p95 / p99 | {1000 * percentile(latencies, 50):.0f} / '
          f'{1000 * percentile(latencies, 95):.0f} / {1000 * percentile(latencies, 99):.0f} ms | |')
    print(f'| errors | {errors[0]} of {len(latencies)} | 0 |')
    print(f'| single request, idle (median of {args.single}) | {1000 * single_median:.0f} ms = '
          f'{single_median / predict_per_image:.2f}x main_predict\'s per image | <= 1.5x |')
    print(f'| server RSS after 100 / {len(latencies)} requests | {rss_100[0]:.0f} / {rss_end:.0f} MB '
          f'({rss_end / rss_100[0] - 1:+.1%}) | within 10% |')
    print(f'| scores equal to main_predict.py (rel 1e-6) | {"all" if not mismatches else mismatches[:3]} | all |')


if __name__ == '__main__':
    main()
