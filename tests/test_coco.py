"""COCO-Stuff/Things from generated files in each official layout: the coarse label spaces derived from JSON
categories, stuff+thing pixel maps, stuff pixel maps, JSON rendered with pycocotools, panoptic PNGs.

Only the JSON layout needs pycocotools (to write compressed RLEs and to render): those tests carry
`requires_pycocotools`; the others run without the coco extra."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hummingbird_fungi.data.coco import Category, categories_of, label_space
from hummingbird_fungi.data.segmentation import build_dataset
from hummingbird_fungi.errors import DataError
from optional_packages import requires_pycocotools

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own, under numpy 2

# The official COCO 2017 categories (instances: things; stuff: stuff and "other"), by supercategory.
THINGS = {
    "person": [(1, "person")],
    "vehicle": [(2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
                (8, "truck"), (9, "boat")],
    "outdoor": [(10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"), (15, "bench")],
    "animal": [(16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"),
               (23, "bear"), (24, "zebra"), (25, "giraffe")],
    "accessory": [(27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase")],
    "sports": [(34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"),
               (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
               (43, "tennis racket")],
    "kitchen": [(44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"),
                (51, "bowl")],
    "food": [(52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"),
             (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake")],
    "furniture": [(62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"),
                  (70, "toilet")],
    "electronic": [(72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone")],
    "appliance": [(78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator")],
    "indoor": [(84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"),
               (90, "toothbrush")],
}
STUFF = {
    "textile": [(92, "banner"), (93, "blanket"), (104, "cloth"), (105, "clothes"), (109, "curtain"), (131, "mat"),
                (137, "napkin"), (141, "pillow"), (152, "rug"), (167, "textile-other"), (168, "towel")],
    "plant": [(94, "branch"), (97, "bush"), (119, "flower"), (124, "grass"), (129, "leaves"), (134, "moss"),
              (142, "plant-other"), (163, "straw"), (169, "tree")],
    "building": [(95, "bridge"), (96, "building-other"), (128, "house"), (151, "roof"), (158, "skyscraper"),
                 (166, "tent")],
    "furniture-stuff": [(98, "cabinet"), (107, "counter"), (108, "cupboard"), (110, "desk-stuff"),
                        (112, "door-stuff"), (123, "furniture-other"), (130, "light"), (133, "mirror-stuff"),
                        (156, "shelf"), (161, "stairs"), (165, "table")],
    "structural": [(99, "cage"), (113, "fence"), (138, "net"), (146, "railing"), (164, "structural-other")],
    "raw-material": [(100, "cardboard"), (132, "metal"), (139, "paper"), (143, "plastic")],
    "floor": [(101, "carpet"), (114, "floor-marble"), (115, "floor-other"), (116, "floor-stone"), (117, "floor-tile"),
              (118, "floor-wood")],
    "ceiling": [(102, "ceiling-other"), (103, "ceiling-tile")],
    "sky": [(106, "clouds"), (157, "sky-other")],
    "ground": [(111, "dirt"), (125, "gravel"), (126, "ground-other"), (136, "mud"), (140, "pavement"),
               (144, "platform"), (145, "playingfield"), (147, "railroad"), (149, "road"), (154, "sand"),
               (159, "snow")],
    "water": [(120, "fog"), (148, "river"), (155, "sea"), (178, "water-other"), (179, "waterdrops")],
    "food": [(121, "food-other"), (122, "fruit"), (153, "salad"), (170, "vegetable")],
    "solid": [(127, "hill"), (135, "mountain"), (150, "rock"), (160, "solid-other"), (162, "stone"), (182, "wood")],
    "wall": [(171, "wall-brick"), (172, "wall-concrete"), (173, "wall-other"), (174, "wall-panel"),
             (175, "wall-stone"), (176, "wall-tile"), (177, "wall-wood")],
    "window": [(180, "window-blind"), (181, "window-other")],
    "other": [(183, "other")],
}
# The coarse protocols of Leopart / open-hummingbird-eval: supercategories in sorted order.
STUFF_15 = ["building", "ceiling", "floor", "food", "furniture-stuff", "ground", "plant", "raw-material", "sky",
            "solid", "structural", "textile", "wall", "water", "window"]
THINGS_12 = ["accessory", "animal", "appliance", "electronic", "food", "furniture", "indoor", "kitchen", "outdoor",
             "person", "sports", "vehicle"]
SIZE = (8, 6)  # (w, h) of every generated image


def category_json(table: dict, panoptic: bool | None = None) -> list[dict]:
    """JSON `categories` from a supercategory table (panoptic files add isthing)."""
    out = [{"id": i, "name": name, "supercategory": sup} for sup, members in table.items() for i, name in members]
    if panoptic is not None:
        for entry in out:
            entry["isthing"] = int(panoptic)
    return sorted(out, key=lambda c: c["id"])


def write_json(path: Path, data: dict) -> Path:
    """A JSON file (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_images(folder: Path, stems) -> None:
    """Random RGB jpgs of SIZE."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(stems):
        pixels = np.random.default_rng(i).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{stem}.jpg")


def write_png(path: Path, values: np.ndarray) -> None:
    """A single-channel uint8 PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)


def columns(*values) -> np.ndarray:
    """A (6, 8) map whose column pairs hold the four given values."""
    return np.repeat(np.array(values, dtype=np.int64), 2)[None].repeat(SIZE[1], axis=0)


def make_coco_pixel_maps(root: Path) -> Path:
    """images/val2017, stuffthingmaps_trainval2017/val2017 (value = id - 1), instances and stuff val2017 JSON."""
    write_images(root / "images" / "val2017", ["000000000001", "000000000002"])
    maps = root / "stuffthingmaps_trainval2017" / "val2017"
    write_png(maps / "000000000001.png", columns(0, 148, 255, 2))  # person, road, unlabelled, car
    write_png(maps / "000000000002.png", columns(156, 182, 91, 255))  # sky-other, other, banner, unlabelled
    write_json(root / "annotations" / "instances_val2017.json", {"categories": category_json(THINGS)})
    write_json(root / "annotations" / "stuff_val2017.json", {"categories": category_json(STUFF)})
    return root


def make_coco_stuff_pixel_maps(root: Path) -> Path:
    """COCO-Stuff's stuff-only layout: annotations/stuff_annotations/{stuff_val2017.json, stuff_val2017_pixelmaps/}."""
    write_images(root / "val2017", ["000000000001"])
    stuff = root / "annotations" / "stuff_annotations"
    write_png(stuff / "stuff_val2017_pixelmaps" / "000000000001.png", columns(0, 149, 183, 157))
    write_json(stuff / "stuff_val2017.json", {"categories": category_json(STUFF)})
    return root


def rle(mask: np.ndarray, compressed: bool) -> dict:
    """COCO RLE of a boolean (h, w) mask: uncompressed counts (column-major runs) or pycocotools' string."""
    if compressed:
        from pycocotools import mask as mask_utils  # only here: the other layouts need no pycocotools

        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": list(mask.shape), "counts": encoded["counts"].decode()}
    flat = mask.flatten(order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def make_coco_json(root: Path) -> Path:
    """JSON only: instances (a polygon, a crowd RLE under a later polygon) and stuff (compressed RLEs) for one image."""
    write_images(root / "images" / "val2017", ["000000000007"])
    image = {"id": 7, "file_name": "000000000007.jpg", "height": SIZE[1], "width": SIZE[0]}
    crowd = np.zeros((SIZE[1], SIZE[0]), bool)
    crowd[4:6, :4] = True
    instances = [
        {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 4, 1, 4]]},
        {"id": 2, "image_id": 7, "category_id": 3, "iscrowd": 1, "segmentation": rle(crowd, compressed=False)},
        {"id": 3, "image_id": 7, "category_id": 18, "iscrowd": 0, "segmentation": [[0, 3, 2, 3, 2, 5, 0, 5]]},
    ]
    sky, other = np.zeros((SIZE[1], SIZE[0]), bool), np.zeros((SIZE[1], SIZE[0]), bool)
    sky[0] = True
    other[1:, :] = True
    stuff = [{"id": 10, "image_id": 7, "category_id": 157, "iscrowd": 0, "segmentation": rle(sky, compressed=True)},
             {"id": 11, "image_id": 7, "category_id": 183, "iscrowd": 0, "segmentation": rle(other, compressed=True)}]
    write_json(root / "annotations" / "instances_val2017.json",
               {"images": [image], "annotations": instances, "categories": category_json(THINGS)})
    write_json(root / "annotations" / "stuff_val2017.json",
               {"images": [image], "annotations": stuff, "categories": category_json(STUFF)})
    return root


def make_coco_panoptic(root: Path) -> Path:
    """annotations/panoptic_val2017.json + annotations/panoptic_val2017/*.png (RGB segment ids)."""
    write_images(root / "images" / "val2017", ["000000000009"])
    segment = np.zeros((SIZE[1], SIZE[0]), np.int64)
    segment[:, 2:4], segment[:, 4:6], segment[:, 6:] = 300, 70000, 5  # person, sky-other-merged, bus
    rgb = np.stack([segment % 256, segment // 256 % 256, segment // 65536], axis=-1).astype(np.uint8)
    (root / "annotations" / "panoptic_val2017").mkdir(parents=True)
    Image.fromarray(rgb).save(root / "annotations" / "panoptic_val2017" / "000000000009.png")
    categories = (category_json({"person": [(1, "person")], "vehicle": [(6, "bus")]}, panoptic=True)
                  + category_json({"sky": [(187, "sky-other-merged")], "wall": [(199, "wall-other-merged")]},
                                  panoptic=False))
    segments = [{"id": 300, "category_id": 1}, {"id": 70000, "category_id": 187}, {"id": 5, "category_id": 6}]
    write_json(root / "annotations" / "panoptic_val2017.json", {
        "images": [{"id": 9, "file_name": "000000000009.jpg", "height": SIZE[1], "width": SIZE[0]}],
        "annotations": [{"image_id": 9, "file_name": "000000000009.png", "segments_info": segments}],
        "categories": categories})
    return root


def test_coarse_label_spaces_come_from_the_json_categories():
    things = categories_of({"categories": category_json(THINGS)}, "instances", Path("i.json"))
    stuff = categories_of({"categories": category_json(STUFF)}, "stuff", Path("s.json"))
    assert len(things) == 80 and sorted(c.id for c in stuff) == list(range(92, 184))
    names, table = label_space(stuff + things, "stuff")
    assert list(names) == STUFF_15
    assert table[149] == STUFF_15.index("ground") and table[92] == STUFF_15.index("textile")
    assert table[183] == 255 and table[1] == 255 and table[0] == 255  # other, a thing, unlabelled
    names, table = label_space(stuff + things, "things")
    assert list(names) == THINGS_12
    assert table[1] == THINGS_12.index("person") and table[52] == THINGS_12.index("food")
    assert table[121] == 255  # food-other is stuff
    names, table = label_space(stuff + things, "all")
    assert len(names) == 171 and names[0] == "person" and names[79] == "toothbrush" and names[80] == "banner"
    assert table[90] == 79 and table[92] == 80 and table[182] == 170 and table[183] == 255
    renamed = [Category(c.id, c.name, "greenery" if c.supercategory == "plant" else c.supercategory, c.isthing)
               for c in stuff]
    assert "greenery" in label_space(renamed, "stuff")[0]  # no table in the code: names follow the file


def test_stuff_thing_pixel_maps(tmp_path):
    root = make_coco_pixel_maps(tmp_path / "coco")
    ground, sky, textile = (STUFF_15.index(n) for n in ("ground", "sky", "textile"))
    stuff = build_dataset("coco_stuff", root, "val")
    assert (stuff.info.num_classes, stuff.info.ignore_index, list(stuff.info.class_names)) == (15, 255, STUFF_15)
    assert [p.name for p, _ in stuff.samples] == ["000000000001.jpg", "000000000002.jpg"]
    assert np.array_equal(stuff.load(0)[1], columns(255, ground, 255, 255))
    assert np.array_equal(stuff.load(1)[1], columns(sky, 255, textile, 255))
    things = build_dataset("coco_things", root, "val2017")
    assert things.info.num_classes == 12
    person, vehicle = THINGS_12.index("person"), THINGS_12.index("vehicle")
    assert np.array_equal(things.load(0)[1], columns(person, 255, 255, vehicle))
    full = build_dataset("coco_stuff171", root, "val")
    assert full.info.num_classes == 171 and full.info.class_names[2] == "car"
    assert np.array_equal(full.load(0)[1], columns(0, 80 + 57, 255, 2))  # road is the 58th stuff class
    assert np.array_equal(full.load(1)[1], columns(80 + 65, 255, 80, 255))  # sky-other, other, banner


def test_stuff_pixel_maps_in_the_stuff_annotations_folder(tmp_path):
    root = make_coco_stuff_pixel_maps(tmp_path / "coco")
    dataset = build_dataset("coco_stuff", root, "val")
    ground, sky = STUFF_15.index("ground"), STUFF_15.index("sky")
    assert np.array_equal(dataset.load(0)[1], columns(255, ground, 255, sky))  # unlabelled, road, other, sky-other
    with pytest.raises(DataError, match="instances_val2017.json"):
        build_dataset("coco_things", root, "val")  # stuff maps hold no things


@requires_pycocotools
def test_json_annotations_rendered_with_pycocotools(tmp_path):
    root = make_coco_json(tmp_path / "coco")
    person, vehicle, animal = (THINGS_12.index(n) for n in ("person", "vehicle", "animal"))
    expected = np.full((SIZE[1], SIZE[0]), 255)
    expected[1:4, 1:6] = person  # polygon x 1..6, y 1..4
    expected[4:6, :4] = vehicle  # crowd car region (drawn first)
    expected[3:5, 0:2] = animal  # the later dog polygon over both
    things = build_dataset("coco_things", root, "val")
    assert [p.name for p, _ in things.samples] == ["000000000007.jpg"]
    assert np.array_equal(things.load(0)[1], expected)
    stuff = build_dataset("coco_stuff", root, "val")
    sky_row = np.full((SIZE[1], SIZE[0]), 255)
    sky_row[0] = STUFF_15.index("sky")  # "other" (the rest) is void
    assert np.array_equal(stuff.load(0)[1], sky_row)
    full = build_dataset("coco_stuff171", root, "val").load(0)[1]
    assert (full[0] == 80 + 65).all() and full[2, 3] == 0  # sky-other, person
    assert full[4, 1] == 16 and full[5, 1] == 2  # dog over the crowd of cars
    assert full[5, 6] == 255  # only "other"


def test_json_annotations_without_pycocotools_name_the_extra(tmp_path, monkeypatch):
    """JSON-only COCO without pycocotools (blocked here, so this runs with and without the extras): a DataError
    naming the coco extra when the dataset is built, not an ImportError inside a loader worker."""
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    root = tmp_path / "coco"
    write_images(root / "images" / "val2017", ["000000000007"])
    image = {"id": 7, "file_name": "000000000007.jpg", "height": SIZE[1], "width": SIZE[0]}
    polygon = {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 4, 1, 4]]}
    write_json(root / "annotations" / "instances_val2017.json",
               {"images": [image], "annotations": [polygon], "categories": category_json(THINGS)})
    with pytest.raises(DataError, match=r"pycocotools.*hummingbird-fungi\[coco\]"):
        build_dataset("coco_things", root, "val")


def test_panoptic_annotations(tmp_path):
    root = make_coco_panoptic(tmp_path / "coco")
    things = build_dataset("coco_things", root, "val")
    assert things.info.class_names == ("person", "vehicle")
    assert np.array_equal(things.load(0)[1], columns(255, 0, 255, 1))
    stuff = build_dataset("coco_stuff", root, "val")
    assert stuff.info.class_names == ("sky", "wall")
    assert np.array_equal(stuff.load(0)[1], columns(255, 255, 0, 255))


def test_missing_labels_and_file_sets(tmp_path):
    root = make_coco_pixel_maps(tmp_path / "coco")
    (tmp_path / "one.txt").write_text("000000000002.jpg\n")
    assert build_dataset("coco_stuff", root, "val", file_set=tmp_path / "one.txt").ids == ["000000000002"]
    (root / "stuffthingmaps_trainval2017" / "val2017" / "000000000002.png").unlink()
    with pytest.raises(DataError, match="000000000002"):
        build_dataset("coco_stuff", root, "val")
    write_images(root / "images" / "train2017", ["000000000003"])
    with pytest.raises(DataError, match="no labels for train2017"):
        build_dataset("coco_things", root, "train")
