"""The authors' weights on demand, through a file:// mirror (no network here)."""
import hashlib
import shutil
import subprocess
import sys

import pytest

from codes import pretrained
from codes.errors import UserError
from codes.mvtecad import OBJS
from tests.conftest import REPO


def test_digests_are_the_shared_ones(ckpt_sums):
    assert pretrained.SHA256 == {obj: ckpt_sums[f'{obj}/enchier.pkl'] for obj in OBJS}


def test_download_from_a_mirror_verifies_and_lands(ckpt_dir, tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'codes.pretrained', 'download', 'bottle,zipper',
                           f'--ckpt_dir={tmp_path / "ckpts"}'], capture_output=True, text=True, cwd=REPO,
                          env={'PATH': '', pretrained.URL_VARIABLE: ckpt_dir.as_uri()}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f'{tmp_path}/ckpts/{o}/enchier.pkl (SHA-256 verified)' for o in ('bottle', 'zipper')]
    for obj in ('bottle', 'zipper'):
        assert (tmp_path / 'ckpts' / obj / 'enchier.pkl').read_bytes() == (ckpt_dir / obj / 'enchier.pkl').read_bytes()
    assert sorted(p.name for p in (tmp_path / 'ckpts' / 'bottle').iterdir()) == ['enchier.pkl']


def test_corrupted_mirror_is_refused_and_nothing_lands(bottle_ckpt, tmp_path, monkeypatch):
    mirror = tmp_path / 'mirror'
    shutil.copytree(bottle_ckpt.parent, mirror / 'bottle')
    data = bytearray((mirror / 'bottle' / 'enchier.pkl').read_bytes())
    data[5000] ^= 0xFF
    (mirror / 'bottle' / 'enchier.pkl').write_bytes(bytes(data))
    monkeypatch.setenv(pretrained.URL_VARIABLE, mirror.as_uri())
    with pytest.raises(UserError, match=r"is not the authors' bottle checkpoint \(SHA-256 [0-9a-f]{16}\.\.\. expected "
                                        r"d8ba97a6a9a19ddf\.\.\.\): refused, nothing written"):
        pretrained.download('bottle', tmp_path / 'ckpts')
    assert list((tmp_path / 'ckpts' / 'bottle').iterdir()) == []
    assert hashlib.sha256(bytes(data)).hexdigest() != pretrained.SHA256['bottle']


def test_unknown_class_and_unreachable_mirror(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no authors' checkpoint for 'widget': choose from bottle, cable"):
        pretrained.download('widget', tmp_path)
    monkeypatch.setenv(pretrained.URL_VARIABLE, (tmp_path / 'nowhere').as_uri())
    with pytest.raises(UserError, match=r'cannot download file://.*/nowhere/cable/enchier.pkl: .*set '
                                        r'PATCHSVDD_WEIGHTS_URL to a mirror'):
        pretrained.download('cable', tmp_path / 'ckpts')
    assert list((tmp_path / 'ckpts' / 'cable').iterdir()) == []
