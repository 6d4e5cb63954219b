"""Image/mask reading, seeds and the train/eval transforms (docs/protocol.md#datasets, #transforms)."""

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from hummingbird_fungi.runtime import derived_seed
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, REFERENCE_STD, EvalTransform, TrainTransform, normalization,
    random_resized_crop_params, read_image, read_mask, resize_mask,
)


def random_image(h=37, w=53, seed=0):
    """A random RGB PIL image of size (h, w)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def random_mask(h=37, w=53, values=(0, 3, 7, 255), seed=0):
    """A random (h, w) int64 mask over `values`."""
    return np.random.default_rng(seed).choice(np.array(values, dtype=np.int64), size=(h, w))


def test_normalization_presets():
    assert normalization("reference") == (IMAGENET_MEAN, REFERENCE_STD)
    assert normalization("imagenet") == (IMAGENET_MEAN, IMAGENET_STD)
    assert REFERENCE_STD[2] == 0.255
    with pytest.raises(ConfigError, match="bogus"):
        normalization("bogus")


@pytest.mark.parametrize("mode, value", [("L", 90), ("LA", (90, 10)), ("RGBA", (10, 20, 30, 0)), ("P", 1),
                                         ("RGB", (10, 20, 30))])
def test_read_image_modes(tmp_path, mode, value):
    image = Image.new(mode, (6, 4), value)
    if mode == "P":
        image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.save(tmp_path / "x.png")
    out = read_image(tmp_path / "x.png")
    assert out.mode == "RGB" and out.size == (6, 4)
    expected = (90, 90, 90) if mode in ("L", "LA") else (10, 20, 30)
    assert out.getpixel((0, 0)) == expected


def test_read_image_16_bit_scaled_to_8_bit(tmp_path):
    Image.fromarray(np.array([[0, 65535, 257 * 100]], dtype=np.uint16)).save(tmp_path / "deep.png")
    out = np.array(read_image(tmp_path / "deep.png"))
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 255, 100])


def test_read_image_cmyk(tmp_path):
    Image.new("CMYK", (5, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    out = read_image(tmp_path / "cmyk.tif")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0)


def test_read_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (20, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image(tmp_path / "rotated.jpg").size == (10, 20)


def test_read_image_errors_name_the_file(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    random_image(64, 64).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    for name in ("garbage.jpg", "truncated.jpg", "missing.jpg"):
        with pytest.raises(DataError, match=name):
            read_image(tmp_path / name)


def test_read_mask_palette_gives_indices(tmp_path):
    ids = np.array([[0, 1, 2], [15, 255, 1]], dtype=np.uint8)
    mask = Image.fromarray(ids, mode="L").convert("P")
    mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [200] * (3 * 253))  # colours unrelated to ids
    mask.save(tmp_path / "voc.png")
    out = read_mask(tmp_path / "voc.png")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, ids)


def test_read_mask_grey_and_16_bit(tmp_path):
    Image.fromarray(np.array([[0, 150]], dtype=np.uint8)).save(tmp_path / "ade.png")
    Image.fromarray(np.array([[0, 1000]], dtype=np.uint16)).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "ade.png"), [[0, 150]])
    np.testing.assert_array_equal(read_mask(tmp_path / "deep.png"), [[0, 1000]])


def test_read_mask_sbd_mat(tmp_path):
    seg = np.array([[0, 5], [20, 0]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "sbd.mat", {"GTcls": {"Segmentation": seg, "CategoriesPresent": np.array([5, 20])}})
    np.testing.assert_array_equal(read_mask(tmp_path / "sbd.mat"), seg)
    scipy.io.savemat(tmp_path / "other.mat", {"x": seg})
    with pytest.raises(DataError, match="other.mat"):
        read_mask(tmp_path / "other.mat")


def test_read_mask_errors_name_the_file(tmp_path):
    Image.new("RGB", (4, 4), (128, 0, 0)).save(tmp_path / "colour.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    for name in ("colour.png", "broken.png", "absent.png"):
        with pytest.raises(DataError, match=name):
            read_mask(tmp_path / name)


def test_derived_seed_is_deterministic_and_63_bit():
    seeds = {derived_seed(s, e, i) for s in range(3) for e in range(3) for i in range(20)}
    assert len(seeds) == 180
    assert all(0 <= s < 2**63 for s in seeds)
    assert derived_seed(1, 2, 3) == derived_seed(1, 2, 3)


def test_crop_params_inside_image_and_fallback():
    rng = torch.Generator().manual_seed(0)
    fallbacks = 0
    for _ in range(300):
        top, left, h, w = random_resized_crop_params(375, 500, (0.5, 2.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        fallbacks += (h, w) == (375, 500)
        assert (h, w) == (375, 500) or h * w >= 0.49 * 375 * 500
    assert 10 < fallbacks < 120  # about 15 % of draws fall back to the whole image
    assert random_resized_crop_params(10, 100, (3.0, 4.0), (3 / 4, 4 / 3), rng) == (0, 43, 10, 13)


def test_crop_params_match_torchvision():
    from torchvision.transforms import RandomResizedCrop

    with torch.random.fork_rng():
        for seed in range(50):
            torch.manual_seed(seed)
            expected = RandomResizedCrop.get_params(torch.zeros(3, 375, 500), (0.5, 2.0), (3 / 4, 4 / 3))
            ours = random_resized_crop_params(375, 500, (0.5, 2.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))
            assert ours == tuple(expected)


def test_train_transform_shapes_and_determinism():
    image, mask = random_image(), random_mask()
    transform = TrainTransform((28, 42))
    a = transform(image, mask, torch.Generator().manual_seed(5))
    b = transform(image, mask, torch.Generator().manual_seed(5))
    c = transform(image, mask, torch.Generator().manual_seed(6))
    assert a[0].shape == (3, 28, 42) and a[0].dtype == torch.float32
    assert a[1].shape == (28, 42) and a[1].dtype == torch.int64
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_train_transform_uses_only_its_generator():
    state = torch.get_rng_state()
    TrainTransform((16, 16))(random_image(), random_mask(), torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_train_transform_keeps_raw_mask_ids():
    mask = random_mask(values=(0, 3, 7, 255))
    transform = TrainTransform((32, 32))
    for seed in range(10):
        _, out = transform(random_image(), mask, torch.Generator().manual_seed(seed))
        assert set(out.unique().tolist()) <= {0, 3, 7, 255}


def test_train_transform_crop_is_paired():
    # the red channel encodes the column, the mask too: the crop must keep them aligned
    columns = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    image = Image.fromarray(np.stack([columns, np.zeros_like(columns), np.zeros_like(columns)], -1))
    transform = TrainTransform((24, 24), jitter=False)
    image_out, mask_out = transform(image, columns.astype(np.int64), torch.Generator().manual_seed(3))
    red = image_out[0] * REFERENCE_STD[0] + IMAGENET_MEAN[0]  # (24, 24) back in [0, 1]
    assert torch.allclose(red * 255, mask_out.float(), atol=6.0)


def test_train_without_augmentation_equals_eval():
    image, mask = random_image(), random_mask()
    train = TrainTransform((28, 42), jitter=False, crop=False)(image, mask, torch.Generator().manual_seed(0))
    evaluation = EvalTransform((28, 42))(image, mask)
    assert torch.equal(train[0], evaluation[0]) and torch.equal(train[1], evaluation[1])


def test_jitter_only_changes_colours_not_geometry():
    image, mask = random_image(), random_mask()
    transform = TrainTransform((28, 42), crop=False)
    outs = [transform(image, mask, torch.Generator().manual_seed(s)) for s in range(4)]
    assert all(torch.equal(o[1], outs[0][1]) for o in outs)
    assert any(not torch.equal(o[0], outs[0][0]) for o in outs)


def test_eval_transform_non_square_and_normalisation():
    image = Image.new("RGB", (53, 37), (255, 0, 128))
    out, mask = EvalTransform((28, 42), normalize="imagenet")(image, random_mask())
    assert out.shape == (3, 28, 42) and out.dtype == torch.float32
    assert mask.shape == (28, 42) and mask.dtype == torch.int64
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    image_only, none = EvalTransform((28, 42))(image)
    assert image_only.shape == (3, 28, 42) and none is None


def test_resize_mask_is_torch_nearest():
    mask = torch.arange(35).reshape(5, 7)
    expected = torch.nn.functional.interpolate(mask[None, None].float(), size=(3, 11), mode="nearest")[0, 0].long()
    assert torch.equal(resize_mask(mask, (3, 11)), expected)


def test_bad_size_is_a_config_error():
    with pytest.raises(ConfigError):
        EvalTransform((0, 10))
