"""Dataset roots inside tar archives: every layout read member by member gives exactly the folder's samples."""

import multiprocessing
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hummingbird_fungi.data.archives import TarPath, as_path, open_archive
from hummingbird_fungi.data.segmentation import build_dataset, collate, read_folder_info
from hummingbird_fungi.data.transforms import EvalTransform
from hummingbird_fungi.errors import DataError
from test_cityscapes import make_cityscapes
from test_coco import make_coco_json, make_coco_panoptic, make_coco_pixel_maps
from test_datasets import make_ade, make_folder, make_voc_flat, make_voc_official
from optional_packages import requires_pycocotools

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own, under numpy 2
LAYOUTS = {  # name -> (generator, dataset kind, split)
    "voc_flat": (make_voc_flat, "voc", "trainaug"),
    "voc_official": (make_voc_official, "voc", "trainaug"),
    "ade20k": (make_ade, "ade20k", "training"),
    "folder": (make_folder, "folder", "train"),
    "cityscapes": (make_cityscapes, "cityscapes", "train"),
    "coco_pixel_maps": (make_coco_pixel_maps, "coco_stuff171", "val"),
    "coco_json": (make_coco_json, "coco_things", "val"),
    "coco_panoptic": (make_coco_panoptic, "coco_stuff", "val"),
}


def make_tar(path: Path, *folders: Path) -> Path:
    """An uncompressed tar of `folders`, each stored under its own name."""
    with tarfile.open(path, "w") as tar:
        for folder in folders:
            tar.add(folder, arcname=folder.name)
    return path


def relative(sample: tuple, prefix: str) -> tuple[str, ...]:
    """A sample's image and mask (file or rendered annotations) named without the archive or folder prefix."""
    return tuple(str(part).removeprefix(prefix) for part in sample)


def files_under(folder: Path) -> set[Path]:
    """Every file below `folder`."""
    return {p for p in folder.rglob("*") if p.is_file()}


NEEDS_PYCOCOTOOLS = {"coco_json"}  # rendered from JSON (and written with compressed RLEs)


@pytest.mark.parametrize("layout", [pytest.param(name, marks=requires_pycocotools) if name in NEEDS_PYCOCOTOOLS
                                    else name for name in sorted(LAYOUTS)])
def test_a_tar_gives_the_folders_samples(layout, tmp_path):
    make, kind, split = LAYOUTS[layout]
    root = make(tmp_path / layout)
    archive = make_tar(tmp_path / f"{layout}.tar", root)
    before = files_under(tmp_path)
    folder = build_dataset(kind, root, split)
    packed = build_dataset(kind, f"{archive}!/{layout}", split)
    assert packed.info == folder.info and packed.ids == folder.ids
    assert ([relative(s, f"{archive}!/") for s in packed.samples]
            == [relative(s, f"{tmp_path}/") for s in folder.samples])
    for index in range(len(folder)):
        (image_a, mask_a), (image_b, mask_b) = folder.load(index), packed.load(index)
        assert np.array_equal(np.asarray(image_a), np.asarray(image_b)) and np.array_equal(mask_a, mask_b)
    assert files_under(tmp_path) == before  # nothing extracted


def test_tar_root_syntax_and_path_api(tmp_path):
    root = make_folder(tmp_path / "camvid", meta="classes: [sky, road, car]\npalette: [[1, 2, 3], [4, 5, 6], "
                                                  "[7, 8, 9]]\n")
    archive = make_tar(tmp_path / "camvid.tar", root)
    assert isinstance(as_path(archive), TarPath) and isinstance(as_path(f"{archive}!/camvid/images"), TarPath)
    assert as_path(tmp_path / "camvid") == tmp_path / "camvid" and not isinstance(as_path("x.tar"), TarPath)
    top = as_path(archive)
    assert top.is_dir() and top.name == "camvid" and [p.name for p in top.iterdir()] == ["camvid"]
    images = top / "camvid" / "images" / "train"
    assert [p.name for p in images.glob("*.jpg")] == ["a.jpg"] and images.is_dir() and not images.is_file()
    assert str(images) == f"{archive}!/camvid/images/train" and as_path(str(images)) == images
    info = read_folder_info(top / "camvid" / "dataset.yaml")
    assert info.class_names == ("sky", "road", "car") and info.palette == ((1, 2, 3), (4, 5, 6), (7, 8, 9))
    with pytest.raises(DataError, match="nowhere"):
        build_dataset("folder", f"{archive}!/nowhere", "train")


def test_whole_archive_as_root(tmp_path):
    root = make_folder(tmp_path / "d", meta="num_classes: 11\nignore_index: 11\n")
    with tarfile.open(tmp_path / "flat.tar", "w") as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
    dataset = build_dataset("folder", tmp_path / "flat.tar", "train")
    assert dataset.info.name == "flat" and dataset.ids == ["a", "b", "c"]  # named after the archive


def test_compressed_archives_are_refused(tmp_path):
    root = make_folder(tmp_path / "d")
    with tarfile.open(tmp_path / "d.tar", "w:gz") as tar:
        tar.add(root, arcname="d")
    with pytest.raises(DataError, match="uncompressed"):
        build_dataset("folder", f"{tmp_path / 'd.tar'}!/d", "train")


def test_loader_workers_reopen_the_archive(tmp_path):
    root = make_folder(tmp_path / "d")
    archive = make_tar(tmp_path / "d.tar", root)
    folder = build_dataset("folder", root, "train", transform=EvalTransform((8, 12)))
    packed = build_dataset("folder", f"{archive}!/d", "train", transform=EvalTransform((8, 12)))
    packed.load(0)  # the parent opens its handle before the workers fork
    loader = torch.utils.data.DataLoader(packed, batch_size=1, num_workers=2, collate_fn=collate)
    batches = list(loader) + list(loader)
    expected = [folder[i] for i in range(len(folder))] * 2
    assert all(torch.equal(b["image"][0], e["image"]) and torch.equal(b["mask"][0], e["mask"])
               for b, e in zip(batches, expected))


def read_in_process(archive: Path, member: str) -> tuple[bytes, bool]:
    """Read a member through the (inherited) index; whether the handle used belongs to this process."""
    index = open_archive(archive)
    return index.read(member), index._pid == os.getpid()


def test_each_process_opens_its_own_handle(tmp_path):
    root = make_folder(tmp_path / "d")
    archive = make_tar(tmp_path / "d.tar", root)
    index = open_archive(archive)
    expected = index.read("d/dataset.yaml")  # the parent's handle is open before the fork
    with multiprocessing.get_context("fork").Pool(1) as pool:
        data, own_handle = pool.apply(read_in_process, (archive, "d/dataset.yaml"))
    assert data == expected == (root / "dataset.yaml").read_bytes() and own_handle
    copy = pickle.loads(pickle.dumps(index))  # spawned workers get the index without a handle
    assert copy._handle is None and copy.read("d/dataset.yaml") == expected
