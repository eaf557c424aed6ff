"""Encoders, classifier, dense embedding and checkpoints."""
import hashlib

import numpy as np
import pytest
import torch

from codes.checkpoints import load_encoder, load_into, save_module
from codes.embeddings import embed_images
from codes.errors import UserError
from codes.losses import patch_svdd_losses
from codes.mvtecad import OBJS
from codes.networks import EncoderDeep, EncoderHier, PositionClassifier, count_parameters
from tests.conftest import missing


def test_output_shapes():
    torch.manual_seed(0)
    enc = EncoderHier(64, 64)
    assert enc(torch.randn(5, 3, 64, 64)).shape == (5, 64, 1, 1)
    assert enc.enc(torch.randn(5, 3, 32, 32)).shape == (5, 64, 1, 1)
    assert EncoderDeep(32, 16)(torch.randn(2, 3, 32, 32)).shape == (2, 16, 1, 1)
    assert PositionClassifier(64, 64)(torch.randn(5, 64, 1, 1), torch.randn(5, 64, 1, 1)).shape == (5, 8)
    with torch.no_grad():
        assert float(enc(torch.randn(2, 3, 64, 64)).abs().max()) <= 1.0   # tanh


def test_parameter_count_and_keys():
    enc = EncoderHier(64, 64)
    assert count_parameters(enc) == 401_984
    keys = set(enc.state_dict())
    assert keys == {f'enc.conv{i}.{p}' for i in range(1, 9) for p in ('weight', 'bias')} | \
        {f'conv{i}.{p}' for i in (1, 2) for p in ('weight', 'bias')}


def test_normalized_layer_weight_gets_no_gradient():
    torch.manual_seed(0)
    enc, c64, c32 = EncoderHier(64, 8), PositionClassifier(64, 8), PositionClassifier(32, 8)
    x = np.random.default_rng(0).normal(size=(1, 3, 256, 256)).astype(np.float32)
    from codes.datasets import training_datasets
    from torch.utils.data import default_collate
    batch = default_collate([training_datasets(x, repeat=4, seed=0)[i] for i in range(4)])
    patch_svdd_losses(enc, c64, c32, batch, 1e-3)['total'].backward()
    for cls in (c64, c32):
        assert cls.fc3.weight.grad is None
        assert cls.fc3.bias.grad is not None and float(cls.fc3.bias.grad.abs().sum()) > 0
        assert float(cls.fc1.weight.grad.abs().sum()) > 0
    assert float(enc.enc.conv1.weight.grad.abs().sum()) > 0


def test_dense_embeddings_equal_patch_by_patch():
    torch.manual_seed(1)
    enc = EncoderHier(64, 64).eval()
    images = np.random.default_rng(1).integers(0, 256, size=(2, 256, 256, 3), dtype=np.uint8)
    mean = images.astype(np.float32).mean(0)
    emb64, emb32 = embed_images(enc, images, mean, 'cpu')
    assert emb64.shape == (2, 13, 13, 64) and emb32.shape == (2, 57, 57, 64)
    x = torch.from_numpy(((images.astype(np.float32) - mean) / 255).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        p32 = torch.stack([torch.stack([enc.enc(x[:, :, 4 * i:4 * i + 32, 4 * j:4 * j + 32])[:, :, 0, 0]
                                        for j in range(57)], 1) for i in range(57)], 1).numpy()
        p64 = torch.stack([torch.stack([enc(x[:, :, 16 * i:16 * i + 64, 16 * j:16 * j + 64])[:, :, 0, 0]
                                        for j in range(13)], 1) for i in range(13)], 1).numpy()
    np.testing.assert_allclose(emb32, p32, atol=1e-6)
    np.testing.assert_allclose(emb64, p64, atol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(2)
    enc = EncoderHier(64, 32)
    path = tmp_path / 'sub' / 'enchier.pkl'
    save_module(enc, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ['enchier.pkl']   # no temporary left behind
    loaded = load_encoder(path, 32)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_checkpoint_for_another_D_is_refused_naming_the_shapes(tmp_path):
    path = tmp_path / 'enchier.pkl'
    save_module(EncoderHier(64, 32), path)
    with pytest.raises(UserError, match=r'does not fit EncoderHier: shapes differ .*enc\.conv8\.weight'):
        load_encoder(path, 64)


def test_classifier_is_not_an_encoder(tmp_path):
    path = tmp_path / 'cls.pkl'
    save_module(PositionClassifier(64, 64), path)
    with pytest.raises(UserError, match='missing keys conv1.bias, .*unexpected keys fc1.bias'):
        load_into(EncoderHier(64, 64), path)


def test_all_authors_checkpoints_load(ckpt_dir, ckpt_sums):
    x = torch.zeros(1, 3, 64, 64)
    for obj in OBJS:
        path = ckpt_dir / obj / 'enchier.pkl'
        if not path.is_file():
            missing(f"the authors' {obj} checkpoint (not at {path})", 'python -m codes.pretrained download all '
                    f'--ckpt_dir={ckpt_dir}')
        assert hashlib.sha256(path.read_bytes()).hexdigest() == ckpt_sums[f'{obj}/enchier.pkl']
        enc = load_encoder(path, 64)
        assert count_parameters(enc) == 401_984
        with torch.no_grad():
            assert enc(x).shape == (1, 64, 1, 1)
