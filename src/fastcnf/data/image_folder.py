"""Folders of PNG / JPEG images (``data.name: image_folder``), read with Pillow.

The layout is torchvision's ``ImageFolder`` convention: ``root/<class>/<image>``, one sub-folder
per class, labels ``0..K-1`` in the sorted order of the sub-folder names; a folder holding the
images directly is unlabelled. Every image must have one size; they are read as 8-bit grey when all
are grey, else as 8-bit RGB (palette and alpha images converted, as torchvision's ``ImageFolder``
does), kept as ``uint8`` ``(N, C, H, W)`` with 256 levels and dequantised by
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
#: 8-bit modes read as grey, and those read as RGB (torchvision's ImageFolder converts every image to RGB)
_GREY_MODES = ("L", "LA", "1")
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr")
_MODE_NAMES = {"L": "grey", "LA": "grey with alpha", "1": "1-bit", "P": "palette", "PA": "palette with alpha",
               "RGBA": "RGB with alpha"}


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
    run's). The images are read as 8-bit grey when every one is grey (``L``, ``LA``, ``1``), else
    as RGB: palette, alpha and other 8-bit colour modes are converted as torchvision's ``ImageFolder``
    converts them (an alpha channel is dropped), with one warning saying how many. Raises
    :class:`DataError` for a missing or empty folder, an unreadable image, a mode that is not 8-bit
    (16-bit, float), mixed sizes (naming two files) and, under ``expect``, another size or a colour
    image for a grey run."""
    import warnings

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

    images, modes, first = [], [], None
    for f in files:  # decoded once; converted below, when the folder's mode is known
        try:
            with Image.open(f) as im:
                mode, size = im.mode, im.size
                im.load()  # the pixels stay in memory after the file is closed
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{f} is not a readable image ({type(e).__name__}); remove or replace it") from e
        if mode not in _GREY_MODES + _COLOUR_MODES:
            raise DataError(f"{f} has mode {mode!r}; images must be 8-bit (grey, RGB, palette, with or without "
                            "alpha): convert it (e.g. PIL's Image.convert('RGB'))")
        if first is None:
            first = (f, size)
        elif size != first[1]:
            raise DataError(f"{root} mixes image sizes: {first[0]} is {_describe(first[1])}, {f} is "
                            f"{_describe(size)}; make every image the same size")
        images.append(im)
        modes.append(mode)
    colour = [i for i, m in enumerate(modes) if m not in _GREY_MODES]
    grey = not colour
    if expect is not None:  # a run's images: its size, and no colour image for a grey run
        wrong = 0 if (first[1][1], first[1][0]) != tuple(expect[1:]) else \
            colour[0] if expect[0] == 1 and colour else None
        if wrong is not None:
            raise DataError(f"{files[wrong]} is {_describe(first[1], modes[wrong])}, the run was trained on "
                            f"{expect[0]}x{expect[1]}x{expect[2]} (C x H x W) images; resize / convert them")
        grey = expect[0] == 1
    target = "L" if grey else "RGB"
    arrays = [np.asarray(im if im.mode == target else im.convert(target)) for im in images]
    arrays = [a.reshape(a.shape[0], a.shape[1], -1) for a in arrays]
    converted = {m: modes.count(m) for m in sorted(set(modes)) if m != target}
    if converted:
        warnings.warn(f"{root}: read {sum(converted.values())} of {len(files)} images as "
                      f"{'grey' if grey else 'RGB'}, converted from "
                      f"{', '.join(f'{_MODE_NAMES.get(m, m)} ({k})' for m, k in converted.items())}"
                      + ("; the alpha channel is dropped" if any("A" in m for m in converted) else ""), stacklevel=2)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    y = None if labels is None else torch.tensor(labels, dtype=torch.int64)
    return x, y, classes, files


def _describe(size: tuple[int, int], mode: str | None = None) -> str:
    return f"{size[0]}x{size[1]} (W x H)" + ("" if mode is None else f" {_MODE_NAMES.get(mode, mode)}")


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
        val=None if val is None else DataSplit(*val), class_names=classes or None)
