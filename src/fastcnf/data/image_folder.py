"""Folders of PNG / JPEG images (``data.name: image_folder``), read with Pillow.

The layout is torchvision's ``ImageFolder`` convention: ``root/<class>/<image>``, one sub-folder
per class, labels ``0..K-1`` in the sorted order of the sub-folder names; a folder holding the
images directly is unlabelled. Every image must have one size and one mode, 8-bit grey (``L``)
or 8-bit RGB; they are kept as ``uint8`` ``(N, C, H, W)`` with 256 levels and dequantised by
the trainer, so results are in bits/dim as for MNIST (Grathwohl et al. 2019, FFJORD §5;
Theis et al. 2016, "A note on the evaluation of generative models").

Example:
    >>> import os, tempfile, numpy as np
    >>> from PIL import Image
    >>> root = tempfile.mkdtemp()
    >>> for c in ("cat", "dog"):
    ...     os.makedirs(os.path.join(root, c))
    ...     for i in range(5):
    ...         Image.fromarray(np.full((4, 4), 10 * i, np.uint8)).save(os.path.join(root, c, f"{i}.png"))
    >>> x, y, classes, files = read_image_folder(root)
    >>> tuple(x.shape), y.tolist()[:6], classes
    ((10, 1, 4, 4), [0, 0, 0, 0, 0, 1], ['cat', 'dog'])
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import DataBundle, DataError, DataSplit

__all__ = ["IMAGE_SUFFIXES", "read_image_folder", "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CHANNELS = {"L": 1, "RGB": 3}


def _image_files(root: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    is_image = (lambda f: f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if subdirs:
        files, labels = [], []
        for k, d in enumerate(subdirs):
            found = sorted(f for f in d.rglob("*") if is_image(f))
            files += found
            labels += [k] * len(found)
        return files, labels, [d.name for d in subdirs]
    return sorted(f for f in root.iterdir() if is_image(f)), None, []


def read_image_folder(path: str | Path, what: str = "data.path",
                      expect: tuple[int, int, int] | None = None):
    """``(x, y, classes, files)``: ``uint8`` images ``(N, C, H, W)``, labels (``int64`` or None),
    the class names and the files read. ``expect``: the ``(C, H, W)`` every image must have (a
    run's). Raises :class:`DataError` for a missing or empty folder, an unreadable image, a mode
    other than 8-bit grey / RGB, and mixed sizes or modes (naming two offending files)."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such folder; set {what} to a folder of PNG / JPEG images")
    if not root.is_dir():
        raise DataError(f"{root} is a file; set {what} to a folder of PNG / JPEG images (tables: data.name=table)")
    files, labels, classes = _image_files(root)
    if not files:
        raise DataError(f"{root} holds no PNG / JPEG images ({', '.join(IMAGE_SUFFIXES)}); put the images in it "
                        "or in one sub-folder per class")
    arrays, first = [], None
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                mode, size = im.mode, im.size
                a = np.asarray(im)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{f} is not a readable image ({type(e).__name__}); remove or replace it") from e
        if mode not in _CHANNELS:
            raise DataError(f"{f} has mode {mode!r}; images must be 8-bit grey (L) or RGB: convert it "
                            "(e.g. PIL's Image.convert('RGB'))")
        if first is None:
            first = (f, mode, size)
            if expect is not None and (_CHANNELS[mode], size[1], size[0]) != tuple(expect):
                raise DataError(f"{f} is {_describe(mode, size)}, the run was trained on "
                                f"{expect[0]}x{expect[1]}x{expect[2]} (C x H x W) images; resize / convert them")
        elif (mode, size) != first[1:]:
            raise DataError(f"{root} mixes image sizes or modes: {first[0]} is {_describe(*first[1:])}, {f} is "
                            f"{_describe(mode, size)}; make every image the same size and mode")
        arrays.append(a.reshape(size[1], size[0], -1))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    y = None if labels is None else torch.tensor(labels, dtype=torch.int64)
    return x, y, classes, files


def _describe(mode: str, size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]} (W x H) {'grey' if mode == 'L' else mode}"


def load_image_folder(cfg, seed: int = 0) -> DataBundle:
    """The ``image_folder`` data set of ``cfg`` (see the module docstring): ``data.test_path`` /
    ``data.val_path`` folders or seeded random splits (``data.test_fraction``, ``data.val_fraction``
    of the rest)."""
    if not cfg.path:
        raise DataError("data.name=image_folder needs data.path: a folder of PNG / JPEG images")
    x, y, classes, _ = read_image_folder(cfg.path)
    rng = np.random.default_rng(seed)
    parts: list[str] = []

    def held_out(attr: str, fraction: float, x, y):
        p = getattr(cfg, attr)
        if p:
            hx, hy, hclasses, _ = read_image_folder(p, f"data.{attr}", expect=tuple(x.shape[1:]))
            if hclasses != classes:
                raise DataError(f"{p} ({'data.' + attr}) has class folders {hclasses}, {cfg.path} has {classes}; "
                                "they must match")
            parts.append(f"{attr[:-5]} from {p}")
            return (x, y), (hx, hy)
        n_out = int(fraction * len(x))
        if n_out == 0:
            return (x, y), None
        perm = torch.from_numpy(rng.permutation(len(x)))
        keep, out = perm[n_out:].sort().values, perm[:n_out].sort().values
        parts.append(f"{attr[:-5]}: a seeded random {fraction:g} of the images ({n_out})")
        pick = (lambda a, i: None if a is None else a[i])
        return (x[keep], pick(y, keep)), (x[out], pick(y, out))

    (x, y), test = held_out("test_path", cfg.test_fraction, x, y)
    if test is None:
        raise DataError(f"{cfg.path} has {len(x)} images: too few for data.test_fraction={cfg.test_fraction}; "
                        "give data.test_path or more images")
    (x, y), val = held_out("val_path", cfg.val_fraction, x, y)
    if len(x) == 0:
        raise DataError(f"{cfg.path}: no training images are left after the held-out splits")
    c, h, w = x.shape[1:]
    return DataBundle(
        name="image_folder", train=DataSplit(x, y), test=DataSplit(*test), shape=(c, h, w),
        num_classes=len(classes) or None, levels=256,
        split=f"image folder {cfg.path} ({c}x{h}x{w}, {len(classes) or 'no'} classes); {'; '.join(parts)}; "
              f"train: the remaining {len(x)} images",
        val=None if val is None else DataSplit(*val))
