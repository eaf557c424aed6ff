"""Backbones: real EfficientNet-Lite0 weights classify ImageNet photos; torchvision-layout ResNet files load strictly."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from codes.backbones import Backbone, packaged_weights
from codes.errors import UserError
from codes.mvtecad import load_images_cropped


def torchvision_resnet_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """torchvision's resnet18 / wide_resnet50_2 state_dict keys and shapes, written out from its layout
    (v1.5 bottleneck; WRN: width 128 in the bottleneck), independently of codes/backbones.py."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(name: str, c: int) -> None:
        shapes.update({f'{name}.weight': (c,), f'{name}.bias': (c,), f'{name}.running_mean': (c,),
                       f'{name}.running_var': (c,), f'{name}.num_batches_tracked': ()})

    shapes['conv1.weight'] = (64, 3, 7, 7)
    bn('bn1', 64)
    cin = 64
    blocks, expansion = ((2, 2, 2, 2), 1) if kind == 'resnet18' else ((3, 4, 6, 3), 4)
    for li, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for b in range(n):
            p = f'layer{li}.{b}'
            stride = 2 if li > 1 and b == 0 else 1
            if kind == 'resnet18':
                shapes[f'{p}.conv1.weight'] = (planes, cin, 3, 3)
                bn(f'{p}.bn1', planes)
                shapes[f'{p}.conv2.weight'] = (planes, planes, 3, 3)
                bn(f'{p}.bn2', planes)
            else:
                width = planes * 2
                shapes[f'{p}.conv1.weight'] = (width, cin, 1, 1)
                bn(f'{p}.bn1', width)
                shapes[f'{p}.conv2.weight'] = (width, width, 3, 3)
                bn(f'{p}.bn2', width)
                shapes[f'{p}.conv3.weight'] = (planes * 4, width, 1, 1)
                bn(f'{p}.bn3', planes * 4)
            if b == 0 and (stride != 1 or cin != planes * expansion):
                shapes[f'{p}.downsample.0.weight'] = (planes * expansion, cin, 1, 1)
                bn(f'{p}.downsample.1', planes * expansion)
            cin = planes * expansion
    shapes['fc.weight'] = (1000, cin)
    shapes['fc.bias'] = (1000,)
    return shapes


def save_random(shapes: dict[str, tuple[int, ...]], folder: Path, stem: str) -> Path:
    """Random values in these shapes, saved under torchvision's naming: <stem>-<first 8 hex of SHA-256>.pth."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, s in shapes.items():
        if k.endswith('num_batches_tracked'):
            state[k] = torch.tensor(0)
        elif k.endswith('running_var'):
            state[k] = torch.rand(s, generator=g) + 0.5
        else:
            state[k] = torch.randn(s, generator=g) * 0.05
    tmp = folder / 'tmp.pth'
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    return tmp.rename(folder / f'{stem}-{digest[:8]}.pth')


def test_efficientnet_lite0_classifies_imagenet_photos(imagenet_photos):
    photos = sorted(imagenet_photos.glob('*.jpeg'))
    assert len(photos) == 20
    assert photos[0].name.startswith('n01440764') and photos[19].name.startswith('n01592084')   # classes 0 and 19
    backbone = Backbone('efficientnet_lite0')
    assert backbone.sha256.startswith('57934424')
    predicted = backbone.logits(load_images_cropped(tuple(photos), 'bicubic', 'photos')).argmax(1).numpy()
    correct = int((predicted == np.arange(20)).sum())     # the README: photo i (sorted) is class i
    assert correct >= 17, predicted


def test_efficientnet_lite0_maps():
    backbone = Backbone('efficientnet_lite0')
    maps = backbone.features(np.zeros((2, 224, 224, 3), np.uint8))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        'layer1': (2, 24, 56, 56), 'layer2': (2, 40, 28, 28), 'layer3': (2, 112, 14, 14)}


@pytest.mark.parametrize('kind,n_keys,channels', [('resnet18', 122, (64, 128, 256)),
                                                  ('wide_resnet50_2', 320, (256, 512, 1024))])
def test_torchvision_layout_loads_strictly(kind, n_keys, channels, tmp_path):
    shapes = torchvision_resnet_shapes(kind)
    assert len(shapes) == n_keys              # torchvision's state_dict sizes
    path = save_random(shapes, tmp_path, kind)
    backbone = Backbone(kind, str(path))
    loaded = backbone.module.state_dict()
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(loaded[k], saved[k]) for k in shapes)
    maps = backbone.features(np.random.default_rng(0).integers(0, 255, (1, 224, 224, 3), dtype=np.uint8))
    assert [tuple(maps[f'layer{i}'].shape) for i in (1, 2, 3)] == [(1, channels[0], 56, 56), (1, channels[1], 28, 28),
                                                                   (1, channels[2], 14, 14)]
    assert all(float(m.min()) >= 0 for m in maps.values())      # after the blocks' final ReLU


def test_bad_weights_are_refused_in_one_line(tmp_path):
    shapes = torchvision_resnet_shapes('resnet18')
    good = save_random(shapes, tmp_path, 'resnet18')
    renamed = good.rename(tmp_path / 'resnet18-f37072fd.pth')      # the real file's name, other bytes
    with pytest.raises(UserError, match=r'SHA-256 begins [0-9a-f]{8}, not f37072fd'):
        Backbone('resnet18', str(renamed))
    wrong = save_random({**shapes, 'fc.weight': (10, 512)}, tmp_path, 'r18')
    with pytest.raises(UserError, match='does not fit --backbone resnet18: shapes differ'):
        Backbone('resnet18', str(wrong))
    with pytest.raises(UserError, match='does not fit --backbone wide_resnet50_2: missing keys'):
        Backbone('wide_resnet50_2', str(wrong))
    with pytest.raises(UserError, match='needs torchvision\'s ImageNet weights: pass --backbone_weights'):
        Backbone('resnet18')
    assert packaged_weights('efficientnet_lite0') is not None


def test_features_are_the_plain_modules_on_a_contiguous_nchw_input():
    """A permuted (channels-last) input runs other convolution kernels: layer3 then differs by ~1e-5, enough to
    change PSDL's OMP supports against the PSDL repository's torchvision pipeline (ToTensor, Normalize: NCHW)."""
    backbone = Backbone('efficientnet_lite0')
    images = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    plain = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float() / 255
    with torch.no_grad():
        expected = backbone.module.features((plain - backbone.mean) / backbone.std)
    got = backbone.features(images, batch_size=2)
    for name in ('layer1', 'layer2', 'layer3'):
        assert torch.equal(got[name], expected[name]), name
