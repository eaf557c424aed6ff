"""Makes README's pictures from the demo's synthetic class (not from MVTec AD, whose licence is
non-commercial): one panel of anomaly maps, and the index page as headless Chromium shows it.

    python docs/make_pictures.py        # needs Debian's chromium (apt-get install chromium)

Writes docs/images/demo_panel.png and docs/images/demo_index.png.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import main_demo  # noqa: E402
import main_visualize  # noqa: E402

IMAGES = REPO / 'docs' / 'images'


def main() -> None:
    browser = shutil.which('chromium') or shutil.which('chromium-browser')
    if browser is None:
        raise SystemExit('make_pictures.py needs Chromium: apt-get install chromium')
    with tempfile.TemporaryDirectory(prefix='patchsvdd-pictures-') as tmp:
        out = Path(tmp)
        main_demo.main([f'--out_dir={out}'])
        maps = out / 'anomaly_maps' / 'synthetic'
        # the four methods side by side: Patch SVDD from the demo's checkpoint, the others on EfficientNet-Lite0
        compare = out / 'compare'
        main_visualize.main(['--obj=synthetic', f'--data_root={out / "data"}', f'--ckpt_dir={out / "ckpts"}',
                             f'--epochs={main_demo.EPOCHS}', '--method=all', f'--out_dir={compare}',
                             f'--cache_dir={out / "cache"}', '--device=cpu'])
        IMAGES.mkdir(parents=True, exist_ok=True)
        panel = next(p for p in sorted(compare.glob('*.png')) if 'spot' in p.name)
        shutil.copyfile(panel, IMAGES / 'demo_panel.png')
        subprocess.run([browser, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars',
                        f'--screenshot={IMAGES / "demo_index.png"}', '--window-size=1100,700',
                        (maps / 'index.html').as_uri()], check=True, capture_output=True, timeout=120)
    print(f'written: {IMAGES / "demo_panel.png"}, {IMAGES / "demo_index.png"}')


if __name__ == '__main__':
    main()
