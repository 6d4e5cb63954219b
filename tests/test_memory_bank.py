"""Memory-bank storage: save/load round trip, refusal of mismatched banks, resume after a crash."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hummingbird_fungi.memory.build as mb
from hummingbird_fungi.errors import BankMismatchError, DataError
from hummingbird_fungi.features.base import PatchFeatures, select_patches
from hummingbird_fungi.memory.bank import MemoryBank
from hummingbird_fungi.config.schema import MemoryOptions
from hummingbird_fungi.memory.build import build_memory_bank


@dataclass
class FakeBackbone:
    """Just what the bank builder reads from a backbone."""

    name: str = "fake"
    architecture: str = "fake"
    weights_id: str = "random"
    patch_size: int = 4

    def grid_size(self, height, width):
        return height // self.patch_size, width // self.patch_size


class PatchMeanFeatures(PatchFeatures):
    """Per-patch colour means plus a constant, normalised: cheap, deterministic features."""

    kind = "patch_mean"

    def __init__(self, backbone, scale: float = 1.0):
        super().__init__(backbone)
        self.scale = scale

    @property
    def dim(self):
        return 4

    def options(self):
        return {"scale": self.scale}

    def __call__(self, images, select=None, image_ids=None):
        pooled = F.avg_pool2d(images, self.encoder.patch_size)  # (B, 3, h, w)
        feats = torch.cat([pooled, torch.full_like(pooled[:, :1], self.scale)], 1).flatten(2).transpose(1, 2)
        return F.normalize(select_patches(feats, select), dim=-1)


@dataclass(frozen=True)
class Info:
    name: str = "toy"
    num_classes: int = 3
    ignore_index: int = 255
    class_names: tuple = ("a", "b", "c")
    void_to_background: bool = False


class ToyDataset(torch.utils.data.Dataset):
    """Random images whose masks follow the colour, with an epoch-dependent shift."""

    info = Info()

    def __init__(self, n=10, size=(8, 12)):
        self.n, self.size, self.epoch = n, size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(1000 * self.epoch + index)
        image = torch.rand(3, *self.size, generator=g)
        mask = (image[0] * 3).long().clamp(max=2)
        mask[0, 0] = 255
        return {"image": image, "mask": mask, "index": index, "path": f"img{index}"}


def spec(**kw):
    """Memory options of the toy banks: 40 rows, 2 augmentation epochs, 3 images per shard, float32."""
    return MemoryOptions(**{"size": 40, "augmentation_epochs": 2, "shard_images": 3, "dtype": "float32",
                            "label_dtype": "float32", **kw})


def test_in_ram_bank_shape_and_labels():
    bank = build_memory_bank(ToyDataset(), PatchMeanFeatures(FakeBackbone()), spec())
    assert bank.count == 2 * 10 * 2  # n_img = 40 // (10 images x 2 epochs) = 2
    assert bank.dim == 4 and bank.num_classes == 3
    labels = np.concatenate(bank.label_blocks)
    assert np.allclose(labels.sum(1), 1.0)
    feats = np.concatenate(bank.feature_blocks)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


def test_save_load_round_trip_and_gather(tmp_path):
    ram = build_memory_bank(ToyDataset(), PatchMeanFeatures(FakeBackbone()), spec())
    disk = build_memory_bank(ToyDataset(), PatchMeanFeatures(FakeBackbone()), spec(path=str(tmp_path / "bank")))
    assert not (tmp_path / "bank.partial").exists()
    assert disk.count == ram.count and len(disk.feature_blocks) == 8  # ceil(10/3) shards x 2 epochs
    ids = torch.tensor([[0, 39], [17, 5]])
    assert torch.equal(disk.gather_features(ids), ram.gather_features(ids))
    assert torch.equal(disk.gather_labels(ids), torch.from_numpy(np.concatenate(ram.label_blocks))[ids])
    loaded = MemoryBank.load(tmp_path / "bank", mmap=False)
    assert loaded.manifest["count"] == ram.count and loaded.manifest["features"]["kind"] == "patch_mean"


def test_mismatched_bank_is_refused(tmp_path):
    extractor = PatchMeanFeatures(FakeBackbone())
    build_memory_bank(ToyDataset(), extractor, spec(path=str(tmp_path / "bank")))
    MemoryBank.load(tmp_path / "bank", expect_features=extractor.manifest())
    other = PatchMeanFeatures(FakeBackbone(weights_id="file:abc"), scale=2.0)
    with pytest.raises(BankMismatchError, match="weights") as err:
        MemoryBank.load(tmp_path / "bank", expect_features=other.manifest())
    assert "scale" in str(err.value)
    with pytest.raises(DataError, match="already exists"):
        build_memory_bank(ToyDataset(), extractor, spec(path=str(tmp_path / "bank")))
    with pytest.raises(DataError, match="missing"):
        MemoryBank.load(tmp_path / "nothing")


def test_interrupted_build_resumes_to_identical_files(tmp_path, monkeypatch):
    extractor = PatchMeanFeatures(FakeBackbone())
    build_memory_bank(ToyDataset(), extractor, spec(path=str(tmp_path / "full")))

    real = mb._extract_shard
    calls = {"n": 0}

    def crash_after_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(mb, "_extract_shard", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        build_memory_bank(ToyDataset(), extractor, spec(path=str(tmp_path / "resumed")))
    assert (tmp_path / "resumed.partial").exists() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(mb, "_extract_shard", real)
    calls["n"] = 0
    build_memory_bank(ToyDataset(), extractor, spec(path=str(tmp_path / "resumed")))
    full = sorted(p.relative_to(tmp_path / "full") for p in (tmp_path / "full").rglob("*") if p.is_file())
    resumed = sorted(p.relative_to(tmp_path / "resumed") for p in (tmp_path / "resumed").rglob("*") if p.is_file())
    assert full == resumed
    for rel in full:
        assert (tmp_path / "full" / rel).read_bytes() == (tmp_path / "resumed" / rel).read_bytes(), rel


def test_partial_build_of_other_config_is_not_mixed(tmp_path, monkeypatch):
    monkeypatch.setattr(mb, "_extract_shard", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        build_memory_bank(ToyDataset(), PatchMeanFeatures(FakeBackbone()), spec(path=str(tmp_path / "b")))
    monkeypatch.undo()
    with pytest.raises(DataError, match="different unfinished build"):
        build_memory_bank(ToyDataset(), PatchMeanFeatures(FakeBackbone(), scale=3.0), spec(path=str(tmp_path / "b")))


def test_subsampling_an_unbounded_bank_equals_a_bounded_build():
    from hummingbird_fungi.memory.build import subsample_bank

    extractor = PatchMeanFeatures(FakeBackbone())
    full = build_memory_bank(ToyDataset(), extractor, spec(size=None))
    assert full.count == 10 * 2 * 6  # 8x12 images, patch 4 -> 6 patches
    direct = build_memory_bank(ToyDataset(), extractor, spec(size=40))
    derived = subsample_bank(full, 2)
    assert np.array_equal(np.concatenate(direct.feature_blocks), np.concatenate(derived.feature_blocks))
    assert np.array_equal(np.concatenate(direct.label_blocks), np.concatenate(derived.label_blocks))
    assert [len(b) for b in derived.feature_blocks] == [len(b) for b in direct.feature_blocks]
    assert derived.manifest["shards"] == direct.manifest["shards"]
    assert torch.equal(derived.row_images(), direct.row_images())


@pytest.mark.parametrize("epochs", [1, 2])  # 2 failed before subsample_bank recorded n_img x items as the size
def test_a_subsampled_bank_records_the_recipe_of_the_equal_bounded_build(epochs):
    """Not only the rows: the derived bank's whole manifest (its recipe's memory size included) is the bounded
    build's, so it is reused, compared and rebuilt as that bank."""
    from hummingbird_fungi.memory.build import subsample_bank

    extractor = PatchMeanFeatures(FakeBackbone())
    full = build_memory_bank(ToyDataset(), extractor, spec(size=None, augmentation_epochs=epochs))
    direct = build_memory_bank(ToyDataset(), extractor, spec(size=20 * epochs, augmentation_epochs=epochs))
    derived = subsample_bank(full, 2)
    assert direct.manifest["patches_per_image"] == derived.manifest["patches_per_image"] == 2
    assert derived.manifest["spec"]["size"] == direct.manifest["spec"]["size"] == 20 * epochs
    assert derived.manifest == direct.manifest


def test_row_images_name_the_image_of_every_row(tmp_path):
    seen = []

    class Recording(PatchMeanFeatures):
        def __call__(self, images, select=None, image_ids=None):
            out = super().__call__(images, select)
            seen.append(image_ids.repeat_interleave(out.shape[1]))  # the ids the builder passed
            return out

    bank = build_memory_bank(ToyDataset(), Recording(FakeBackbone()), spec(path=str(tmp_path / "bank")))
    assert torch.equal(bank.row_images(), torch.cat(seen))
    assert bank.row_images()[:6].tolist() == [0, 0, 1, 1, 2, 2] and bank.row_images()[20:22].tolist() == [0, 0]
    with pytest.raises(DataError, match="which image"):
        MemoryBank.from_arrays(np.ones((2, 4), np.float32), np.ones((2, 3), np.float32), {}).row_images()
