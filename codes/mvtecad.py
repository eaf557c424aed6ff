"""MVTec AD layout: finding a class's files, reading and resizing images and masks, standardising.

Faithful to the original loader (SPEC.md, "Data"): files sorted by path, the test set is the
defective images first and then `test/good`, every image resized to 256x256 with one PIL filter,
masks resized the same way and binarised at > 128, and the training set's per-pixel mean image
subtracted before dividing by 255.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.contrib.concurrent import thread_map

from .errors import UserError

OBJS = ('bottle', 'cable', 'capsule', 'carpet', 'grid', 'hazelnut', 'leather', 'metal_nut',
        'pill', 'screw', 'tile', 'toothbrush', 'transistor', 'wood', 'zipper')
IMAGE_SIZE = 256
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
# Pillow's default filter was NEAREST before 7.0 (the authors' environment) and is BICUBIC since.
RESIZE_FILTERS = {'nearest': Image.Resampling.NEAREST, 'bicubic': Image.Resampling.BICUBIC}
GOOD = 'good'


@dataclass(frozen=True)
class ClassFiles:
    """The files of one class, in the original's order."""
    obj: str
    folder: Path
    train: tuple[Path, ...]
    test: tuple[Path, ...]           # defective images (sorted by path), then test/good (sorted)
    labels: np.ndarray               # per test image: 1 defective, 0 normal
    masks: tuple[Path | None, ...] | None  # per test image (None for normal); None if no ground_truth


@dataclass(frozen=True)
class LoadedClass:
    """A class's images resized to 256x256 (uint8 NHWC) and its binarised test masks."""
    files: ClassFiles
    train: np.ndarray | None         # None when only the test set was loaded
    test: np.ndarray
    masks: np.ndarray | None         # bool (N_test, 256, 256); None when the class has no masks


def resolve_data_root(data_root: str | None) -> Path:
    """The dataset root from --data_root, else $MVTEC_ROOT."""
    root = data_root or os.environ.get('MVTEC_ROOT')
    if not root:
        raise UserError('no dataset root: pass --data_root=/path/to/mvtec_anomaly_detection '
                        'or set the MVTEC_ROOT environment variable (MVTec AD can be downloaded from '
                        'https://www.mvtec.com/company/research/datasets/mvtec-ad)')
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f'dataset root {path} is not a folder: pass --data_root (or MVTEC_ROOT) '
                        'pointing at the folder that holds the class folders')
    return path


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by path (any case of extension)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.as_posix())


def requested_classes(root: Path, obj: str) -> tuple[list[str], list[str]]:
    """--obj as a list: (classes present under root, requested classes not found). `all`: the 15 MVTec AD
    classes; else a comma list."""
    wanted = list(OBJS) if obj == 'all' else [o.strip() for o in obj.split(',') if o.strip()]
    present = [o for o in wanted if (root / o).is_dir()]
    return present, [o for o in wanted if o not in present]


def find_class(root: Path, obj: str) -> ClassFiles:
    """Lists a class's train and test images and pairs each defective image with its mask by stem."""
    folder = root / obj
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / 'train' / GOOD).is_dir())
        raise UserError(f'class folder {folder} not found; classes under {root}: '
                        f'{", ".join(found) if found else "none"}')
    train = list_images(folder / 'train' / GOOD)
    if not train:
        raise UserError(f'{folder / "train" / GOOD} holds no images: a class needs normal training images')
    test_dir = folder / 'test'
    test_all = sorted((p for d in sorted(test_dir.iterdir()) if d.is_dir() for p in list_images(d)),
                      key=lambda p: p.as_posix()) if test_dir.is_dir() else []
    if not test_all:
        raise UserError(f'{test_dir} holds no images: expected test/<defect>/*.png and test/good/*.png')
    defective = [p for p in test_all if p.parent.name != GOOD]
    normal = [p for p in test_all if p.parent.name == GOOD]
    labels = np.array([1] * len(defective) + [0] * len(normal), dtype=np.int32)
    gt_dir = folder / 'ground_truth'
    masks = None
    if gt_dir.is_dir():
        masks = tuple([_find_mask(gt_dir, p) for p in defective] + [None] * len(normal))
        _check_no_orphan_masks(gt_dir, test_dir, set(masks) - {None})
    return ClassFiles(obj, folder, tuple(train), tuple(defective + normal), labels, masks)


def _find_mask(gt_dir: Path, image: Path) -> Path:
    candidates = [p for p in list_images(gt_dir / image.parent.name) if p.stem == f'{image.stem}_mask']
    if not candidates:
        raise UserError(f'no mask for {image}: expected {gt_dir / image.parent.name / (image.stem + "_mask.png")}')
    return candidates[0]


def _check_no_orphan_masks(gt_dir: Path, test_dir: Path, used: set[Path]) -> None:
    for folder in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
        for mask in list_images(folder):
            if mask not in used:
                raise UserError(f'mask {mask} has no test image: expected {test_dir / folder.name}/'
                                f'{mask.stem.removesuffix("_mask")}.<ext>; remove the mask or add its image')


def read_image(path: Path) -> Image.Image:
    """Opens and decodes an image file, turning any failure into a one-line error naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as e:
        raise UserError(f'cannot read image {path}: {e}') from None


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """HxWx3 uint8. Grey is repeated to 3 channels (as the original); alpha is dropped; 16-bit scaled."""
    if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        arr = np.asarray(im, dtype=np.float64)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8) if arr.max() > 255 else arr.astype(np.uint8)
    elif im.mode in ('L', 'RGB'):
        arr = np.asarray(im)
    elif im.mode == 'LA':
        arr = np.asarray(im.getchannel('L'))
    else:
        arr = np.asarray(im.convert('RGB'))
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def rgb_image(im: Image.Image) -> Image.Image:
    """The image as to_rgb_array makes it, as a PIL image (an RGB one as it is: no copies of its pixels)."""
    return im if im.mode == 'RGB' else Image.fromarray(to_rgb_array(im))


def resize(arr: np.ndarray | Image.Image, resize_filter: str) -> np.ndarray:
    """Resizes to 256x256 with PIL, as the original's `Image.fromarray(x).resize((256, 256))`."""
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    return np.asarray(im.resize((IMAGE_SIZE, IMAGE_SIZE), RESIZE_FILTERS[resize_filter]))


def load_image(path: Path, resize_filter: str) -> np.ndarray:
    return resize(rgb_image(read_image(path)), resize_filter)


def load_mask(path: Path, image_path: Path, resize_filter: str) -> np.ndarray:
    """A binarised 256x256 mask (resized with the images' filter, then > 128), checked against its image's size."""
    mask = read_image(path)
    with Image.open(image_path) as im:
        image_size = im.size
    if mask.size != image_size:
        raise UserError(f'mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is '
                        f'{image_size[0]}x{image_size[1]}: masks must match their images')
    arr = np.asarray(mask.convert('L')) if mask.mode != 'L' else np.asarray(mask)
    return resize(arr, resize_filter) > 128


def load_images(paths: tuple[Path, ...], resize_filter: str, desc: str) -> np.ndarray:
    """Reads and resizes images on a small thread pool (decoding releases the GIL); (N,256,256,3) uint8."""
    images = thread_map(lambda p: load_image(p, resize_filter), paths, max_workers=min(4, os.cpu_count() or 1),
                        desc=desc, unit='img', leave=False, disable=None)
    return np.stack(images)


def load_class(files: ClassFiles, resize_filter: str = 'nearest', train: bool = True) -> LoadedClass:
    """Reads each image of the class once."""
    if resize_filter not in RESIZE_FILTERS:
        raise UserError(f'--resize must be one of {", ".join(RESIZE_FILTERS)}, not {resize_filter!r}')
    train_images = load_images(files.train, resize_filter, f'{files.obj} train') if train else None
    test_images = load_images(files.test, resize_filter, f'{files.obj} test')
    masks = None
    if files.masks is not None:
        empty = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        masks = np.stack(thread_map(lambda pair: empty if pair[0] is None else load_mask(*pair, resize_filter),
                                    list(zip(files.masks, files.test)), max_workers=min(4, os.cpu_count() or 1),
                                    desc=f'{files.obj} masks', unit='mask', leave=False, disable=None))
    return LoadedClass(files, train_images, test_images, masks)


def mean_image(train_images: np.ndarray) -> np.ndarray:
    """The training set's per-pixel mean, float32 HxWx3, computed as the original does."""
    return train_images.astype(np.float32).mean(axis=0)


def standardize(images: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(x - mean) / 255 in float32, NCHW."""
    x = (images.astype(np.float32) - mean) / 255
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ---- The PSDL repository's MVTec loader (PSDL_SPEC.md section 1), for PSDL, PaDiM and PatchCore:
# short side to 256 with a PIL filter, centre crop 224; masks the same with NEAREST. Normalisation
# belongs to the backbone (codes/backbones.py), so images stay uint8 here.
CROP_RESIZE = 256
CROP_SIZE = 224
CROP_FILTERS = {'bicubic': Image.Resampling.BICUBIC, 'lanczos': Image.Resampling.LANCZOS,
                'nearest': Image.Resampling.NEAREST}


def resize_center_crop(im: Image.Image, resize_filter: str, short_side: int = CROP_RESIZE,
                       crop: int = CROP_SIZE) -> Image.Image:
    """torchvision's Resize(short_side) then CenterCrop(crop), with PIL (offsets round((in - out) / 2))."""
    w, h = im.size
    if w <= h:
        size = (short_side, int(short_side * h / w))
    else:
        size = (int(short_side * w / h), short_side)
    im = im.resize(size, CROP_FILTERS[resize_filter])
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    return im.crop((left, top, left + crop, top + crop))


def load_image_cropped(path: Path, resize_filter: str) -> np.ndarray:
    return np.asarray(resize_center_crop(rgb_image(read_image(path)), resize_filter))


def load_images_cropped(paths: tuple[Path, ...], resize_filter: str, desc: str) -> np.ndarray:
    """(N,224,224,3) uint8, read on a small thread pool."""
    images = thread_map(lambda p: load_image_cropped(p, resize_filter), paths, max_workers=min(4, os.cpu_count() or 1),
                        desc=desc, unit='img', leave=False, disable=None)
    return np.stack(images)


def load_class_cropped(files: ClassFiles, resize_filter: str = 'bicubic', train: bool = True) -> LoadedClass:
    """A class as the PSDL repository reads it: 224x224 crops, masks cropped the same way (NEAREST, > 128)."""
    train_images = load_images_cropped(files.train, resize_filter, f'{files.obj} train') if train else None
    test_images = load_images_cropped(files.test, resize_filter, f'{files.obj} test')
    masks = None
    if files.masks is not None:
        masks = np.zeros((len(files.test), CROP_SIZE, CROP_SIZE), dtype=bool)
        for i, (mask_path, image_path) in enumerate(zip(files.masks, files.test)):
            if mask_path is not None:
                load_mask(mask_path, image_path, 'nearest')      # checks the mask's size against its image
                mask = read_image(mask_path)
                mask = mask.convert('L') if mask.mode != 'L' else mask
                masks[i] = np.asarray(resize_center_crop(mask, 'nearest')) > 128
    return LoadedClass(files, train_images, test_images, masks)
