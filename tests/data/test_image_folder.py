"""Folders of images (torchvision's ImageFolder convention) and their bad inputs."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastcnf.config import DataConfig
from fastcnf.data import DataError, load_data
from fastcnf.data.image_folder import read_image_folder


def _save(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=None).convert(mode).save(path)


def _folder(root, classes=("b", "a"), n=5, size=(6, 4), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    pixels = {}
    for c in classes:
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            _save(root / c / f"{i}.png", a, mode)
            pixels[(c, i)] = a
    return pixels


def test_subfolders_are_sorted_classes_and_pixels_are_kept_exactly(tmp_path):
    pixels = _folder(tmp_path)
    x, y, classes, files = read_image_folder(tmp_path)
    assert classes == ["a", "b"] and x.dtype == torch.uint8 and tuple(x.shape) == (10, 3, 4, 6)
    assert y.tolist() == [0] * 5 + [1] * 5
    np.testing.assert_array_equal(x[5].permute(1, 2, 0).numpy(), pixels[("b", 0)])


def test_grey_images_and_a_seeded_split_in_bits_per_dim_units(tmp_path):
    _folder(tmp_path, classes=("x",), n=10, mode="L")
    b = load_data(DataConfig(name="image_folder", path=str(tmp_path), test_fraction=0.2))
    assert b.shape == (1, 4, 6) and b.levels == 256 and (len(b.train), len(b.test)) == (8, 2)
    assert b.num_classes == 1 and b.is_image


def test_mixed_sizes_name_two_files(tmp_path):
    _folder(tmp_path, classes=("a",), n=2)
    _save(tmp_path / "a" / "big.png", np.zeros((5, 5, 3), np.uint8), "RGB")
    with pytest.raises(DataError, match=r"mixes image sizes: .*0\.png is 6x4 .*big\.png is 5x5"):
        read_image_folder(tmp_path)


def test_grey_palette_and_alpha_images_beside_rgb_ones_are_read_as_torchvision_converts_them(tmp_path):
    pixels = _folder(tmp_path / "m", classes=("a",), n=2)
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "m" / "a" / "g.png")
    rgba = rng.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "m" / "a" / "h.png")
    pal = Image.fromarray(pixels[("a", 0)]).quantize(colors=16)  # a palette image
    pal.save(tmp_path / "m" / "a" / "p.png")
    with pytest.warns(UserWarning, match=r"read 3 of 5 images as RGB, converted from grey \(1\), palette \(1\), "
                                          r"RGB with alpha \(1\); the alpha channel is dropped"):
        x, _, _, files = read_image_folder(tmp_path / "m")
    got = {f.name: x[i].permute(1, 2, 0).numpy() for i, f in enumerate(files)}
    assert x.shape == (5, 3, 4, 6)
    np.testing.assert_array_equal(got["0.png"], pixels[("a", 0)])
    np.testing.assert_array_equal(got["g.png"], np.repeat(grey[..., None], 3, axis=2))  # grey: R = G = B
    np.testing.assert_array_equal(got["h.png"], rgba[..., :3])  # alpha dropped
    lut = np.array(pal.getpalette()[:48], np.uint8).reshape(16, 3)
    np.testing.assert_array_equal(got["p.png"], lut[np.asarray(pal)])  # the palette looked up
    # a grey run refuses a colour image; an RGB run reads a grey folder as RGB
    with pytest.raises(DataError, match=r"0\.png is 6x4 \(W x H\) RGB, the run was trained on 1x4x6"):
        read_image_folder(tmp_path / "m", expect=(1, 4, 6))
    _folder(tmp_path / "g", classes=("a",), n=2, mode="L")
    with pytest.warns(UserWarning, match=r"read 2 of 2 images as RGB, converted from grey \(2\)"):
        x, _, _, _ = read_image_folder(tmp_path / "g", expect=(3, 4, 6))
    assert x.shape == (2, 3, 4, 6) and (x[:, 0] == x[:, 2]).all()
    # all grey (with a 1-bit image among them): one channel
    Image.fromarray(rng.integers(0, 2, (4, 6), dtype=np.uint8) * 255).convert("1").save(tmp_path / "g" / "a" / "b.png")
    with pytest.warns(UserWarning, match=r"read 1 of 3 images as grey, converted from 1-bit \(1\)$"):
        x, _, _, files = read_image_folder(tmp_path / "g")
    assert x.shape == (3, 1, 4, 6) and set(np.unique(x[[f.name for f in files].index("b.png")].numpy())) <= {0, 255}


def test_unreadable_images_bad_modes_and_empty_folders(tmp_path):
    _folder(tmp_path / "m", classes=("a",), n=2)
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png is not a readable image"):
        read_image_folder(tmp_path / "u")
    (tmp_path / "r").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint16) + 4000).save(tmp_path / "r" / "deep.png")
    with pytest.raises(DataError, match=r"deep\.png has mode 'I;16'; images must be 8-bit"):
        read_image_folder(tmp_path / "r")
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match=r"holds no PNG / JPEG images"):
        read_image_folder(tmp_path / "e")
    with pytest.raises(DataError, match=r"no such folder"):
        read_image_folder(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"the run was trained on 1x4x6"):
        read_image_folder(tmp_path / "m" / "a", expect=(1, 4, 6))
