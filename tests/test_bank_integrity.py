"""What a bank on disk is trusted for (issue 12): shards verified on load and on resume, stale shards rebuilt,
clear errors for damaged or unfinished banks, one build per path, reuse only for the recipe that built it."""

import fcntl
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import hummingbird_fungi.memory.build as mb
from hummingbird_fungi.errors import BankMismatchError, DataError
from hummingbird_fungi.memory.bank import MemoryBank, lock_path, partial_path, read_manifest, shard_files
from hummingbird_fungi.memory.build import bank_manifest, build_memory_bank
from test_memory_bank import FakeBackbone, PatchMeanFeatures, ToyDataset, spec


def files_of(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def crash_after(monkeypatch, shards: int) -> None:
    """Make the next build raise KeyboardInterrupt after extracting `shards` shards."""
    real, calls = mb._extract_shard, []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) > shards:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)
    monkeypatch.setattr(mb, "_extract_shard", crash)


def test_damaged_shard_files_are_named_on_load(tmp_path):
    build_memory_bank(ToyDataset(), PatchMeanFeatures(FakeBackbone()), spec(path=str(tmp_path / "bank")))
    feats, labels = shard_files(tmp_path / "bank", "00001")
    good = feats.read_bytes()
    feats.write_bytes(good[:len(good) // 2])
    with pytest.raises(DataError, match=f"{feats}.*truncated"):
        MemoryBank.load(tmp_path / "bank")
    feats.write_bytes(good + b"junk")
    with pytest.raises(DataError, match=f"{feats}.*damaged"):
        MemoryBank.load(tmp_path / "bank")
    feats.write_bytes(b"not a numpy file at all")
    with pytest.raises(DataError, match=f"{feats} is truncated or not a .npy file"):
        MemoryBank.load(tmp_path / "bank")
    feats.write_bytes(good)
    labels.unlink()
    with pytest.raises(DataError, match=f"{labels} is missing"):
        MemoryBank.load(tmp_path / "bank")


def test_incomplete_manifests_and_unfinished_builds_are_named(tmp_path, monkeypatch):
    extractor = PatchMeanFeatures(FakeBackbone())
    bank = build_memory_bank(ToyDataset(), extractor, spec(path=str(tmp_path / "bank")))
    manifest_file = tmp_path / "bank" / "manifest.json"
    manifest_file.write_text(json.dumps({k: v for k, v in bank.manifest.items() if k != "features"}))
    with pytest.raises(DataError, match=f"{manifest_file} lacks features"):
        MemoryBank.load(tmp_path / "bank")
    manifest_file.write_text("{not json")
    with pytest.raises(DataError, match=f"corrupt memory bank manifest {manifest_file}"):
        MemoryBank.load(tmp_path / "bank")

    crash_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        build_memory_bank(ToyDataset(), extractor, spec(path=str(tmp_path / "other")))
    with pytest.raises(DataError, match="unfinished memory-bank build.*rerun the build"):
        MemoryBank.load(partial_path(tmp_path / "other"))
    with pytest.raises(DataError, match="an interrupted build is in .*other.partial"):
        MemoryBank.load(tmp_path / "other")


def test_resume_rebuilds_a_truncated_shard_and_drops_stale_temporary_files(tmp_path, monkeypatch, caplog):
    extractor = PatchMeanFeatures(FakeBackbone())
    build_memory_bank(ToyDataset(), extractor, spec(path=str(tmp_path / "full")))
    crash_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        build_memory_bank(ToyDataset(), extractor, spec(path=str(tmp_path / "resumed")))
    monkeypatch.undo()
    partial = partial_path(tmp_path / "resumed")
    feats = shard_files(partial, "00001")[0]
    feats.write_bytes(feats.read_bytes()[:100])  # a crash of the storage, not of our writer
    stale = partial / "shards" / ".00003.labels.npy.tmp-dead0000.npy"
    stale.write_bytes(b"half a file of a killed writer")
    build_memory_bank(ToyDataset(), extractor, spec(path=str(tmp_path / "resumed")))
    assert f"rebuilding shard 00001: memory-bank file {feats} is truncated" in caplog.text
    assert "rebuilding shard 00000" not in caplog.text and "rebuilding shard 00002" not in caplog.text
    assert files_of(tmp_path / "full") == files_of(tmp_path / "resumed")


class FileDataset(ToyDataset):
    """ToyDataset whose samples name files on disk (their sizes and times go into the shard records)."""

    def __init__(self, folder: Path, n: int = 10):
        super().__init__(n)
        folder.mkdir(exist_ok=True)
        self.samples = [(folder / f"img{i}.png", folder / f"mask{i}.png") for i in range(n)]
        for sample in self.samples:
            for file in sample:
                if not file.exists():
                    file.write_bytes(b"x")


def test_resume_rebuilds_the_shards_whose_files_changed(tmp_path, monkeypatch, caplog):
    extractor = PatchMeanFeatures(FakeBackbone())
    crash_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        build_memory_bank(FileDataset(tmp_path / "data"), extractor, spec(path=str(tmp_path / "bank")))
    monkeypatch.undo()
    (tmp_path / "data" / "mask4.png").write_bytes(b"an edited mask")  # image 4 lies in shards 1 (epoch 0) and 5
    build_memory_bank(FileDataset(tmp_path / "data"), extractor, spec(path=str(tmp_path / "bank")))
    rebuilt = [line for line in caplog.text.splitlines() if "rebuilding shard" in line]
    assert len(rebuilt) == 1 and "rebuilding shard 00001: its images or masks changed" in rebuilt[0]
    recorded = [shard["sources"] for shard in read_manifest(tmp_path / "bank")["shards"]]
    assert recorded[1] == mb.shard_sources(FileDataset(tmp_path / "data"), 3, 6)
    assert len(set(recorded)) == 4  # two epochs of four


def test_a_second_build_of_the_same_path_waits_for_the_first(tmp_path, caplog):
    results = {}

    def build(name: str) -> None:
        try:
            results[name] = build_memory_bank(ToyDataset(), PatchMeanFeatures(FakeBackbone()),
                                              spec(path=str(tmp_path / name)))
        except DataError as exc:
            results[name] = exc

    for name, finish_meanwhile in (("waits", False), ("refused", True)):
        path = tmp_path / name
        with open(lock_path(path), "a") as other_build:
            fcntl.flock(other_build, fcntl.LOCK_EX)
            caplog.clear()
            thread = threading.Thread(target=build, args=(name,))
            thread.start()
            deadline = time.monotonic() + 30
            while "waiting for it to finish" not in caplog.text:
                assert time.monotonic() < deadline and thread.is_alive()
                time.sleep(0.01)
            assert not partial_path(path).exists()  # nothing written while it waits
            if finish_meanwhile:
                path.mkdir()  # the other build sealed its bank
        thread.join(30)
        assert not thread.is_alive()
    assert results["waits"].count == 40
    assert isinstance(results["refused"], DataError)
    assert "already exists (another build finished it while this one waited)" in str(results["refused"])


def test_a_bank_is_reused_only_for_its_recipe(tmp_path):
    extractor, dataset = PatchMeanFeatures(FakeBackbone()), ToyDataset()
    build_memory_bank(dataset, extractor, spec(path=str(tmp_path / "bank")))
    MemoryBank.load(tmp_path / "bank", expect_build=bank_manifest(dataset, extractor, spec(), 0))
    other = bank_manifest(ToyDataset(n=8), extractor, spec(augmentation_epochs=1), 7, {"data": {"split": "x"}})
    with pytest.raises(BankMismatchError, match="different settings") as error:
        MemoryBank.load(tmp_path / "bank", expect_build=other)
    for key in ("num_images: bank=10, this run=8", "spec.seed: bank=0, this run=7", "spec.augmentation_epochs", "data: bank=None"):
        assert key in str(error.value)
    bank = MemoryBank.load(tmp_path / "bank")
    assert np.isfinite(np.concatenate(bank.feature_blocks)).all()


def test_a_truncated_support_set_is_named(tmp_path):
    from hummingbird_fungi.segment.segmenter import load_support

    file = tmp_path / "support_features.npy"
    np.save(file, np.ones((50, 8), np.float32))
    file.write_bytes(file.read_bytes()[:-40])
    with pytest.raises(DataError, match=f"{file} is truncated"):
        load_support(PatchMeanFeatures(FakeBackbone()), tmp_path)
