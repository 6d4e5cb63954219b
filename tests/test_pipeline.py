"""End to end on a generated dataset with a tiny random ViT: the scores against an independent recomputation,
CLI, reproducibility, backends, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

from hummingbird_fungi.cli.main import main
from hummingbird_fungi.config.loader import load_config
from hummingbird_fungi.eval.hbird import run_hbird
from hummingbird_fungi.memory.bank import MemoryBank
from hummingbird_fungi.models.factory import create_encoder
from optional_packages import requires_faiss
from references import bilinear_matrix

TINY = ["model.name=vit_tiny_patch16_224", "model.pretrained=false", "model.input_size=[64,64]",
        "data.kind=folder", "data.train_split=train", "data.eval_split=val", "data.num_workers=0",
        "memory.size=40", "memory.shard_images=2", "retrieval.k=5", "transfer.temperature=0.1"]


def config(root, *extra):
    return load_config(None, TINY + [f"data.root={root}", *extra])


def corrupt(image):
    """Overwrite an image file with bytes no decoder reads; its original bytes."""
    good = image.read_bytes()
    image.write_bytes(b"not a png")
    return good


# ------------------------------------------------------------------ the evaluation recomputed without the package
# From the saved bank and the model's own timm forward: PIL resize, the reference normalisation written out,
# cosine k-NN with a softmax(cos / T) vote in float64, half-pixel bilinear upsampling, a numpy confusion
# matrix, IoU over the classes present, and scipy's Hungarian matching for the reference mIoU.

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.255])  # 'reference' (its 0.255 typo)


def unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def recomputed(root, bank_path, seed: int, size: tuple[int, int], original: bool, k: int = 5, temperature=0.1,
               transform=None):
    """(standard mIoU, reference mIoU, per-class IoU) of the toy validation split, computed independently;
    `transform`: a map of raw rows (n, D) -> (n, d) applied to memory rows and query patches before the cosine
    (the neighbours are ranked by the transformed memory rows rounded to the bank's float16, as it indexes them)."""
    bank = MemoryBank.load(bank_path)
    memory = np.concatenate(bank.feature_blocks).astype(np.float64)  # (M, D) unit rows
    ranked = memory
    if transform is not None:
        memory = unit(transform(memory))
        ranked = memory.astype(np.float16).astype(np.float64)
    labels = np.concatenate(bank.label_blocks).astype(np.float64)  # (M, C)
    model = create_encoder("vit_tiny_patch16_224", pretrained=False, seed=seed).model  # the run's random weights
    classes, void, (height, width) = 3, 3, size
    grid = (height // 16, width // 16)
    matrix = np.zeros((classes, classes), np.int64)
    for image_file in sorted((root / "images" / "val").glob("*.png")):
        mask = np.asarray(Image.open(root / "annotations" / "val" / image_file.name)).astype(np.int64)
        image = Image.open(image_file).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        pixels = (np.asarray(image, np.float64) / 255 - MEAN) / STD  # (H, W, 3)
        with torch.no_grad():
            tokens = model.forward_features(torch.from_numpy(pixels).permute(2, 0, 1)[None].float())
        patches = unit(tokens[0, model.num_prefix_tokens:].double().numpy())  # (N, D)
        if transform is not None:
            patches = unit(transform(patches))
        cos = patches @ memory.T  # (N, M)
        top = np.argsort(-(patches @ ranked.T), axis=1, kind="stable")[:, :k]
        weights = np.exp(np.take_along_axis(cos, top, 1) / temperature)
        probs = np.einsum("nk,nkc->nc", weights / weights.sum(1, keepdims=True), labels[top])  # (N, C)
        if not original:  # nearest resize of the mask to the network input
            rows = np.floor(np.arange(height) * mask.shape[0] / height).astype(int)
            cols = np.floor(np.arange(width) * mask.shape[1] / width).astype(int)
            mask = mask[rows][:, cols]
        maps = probs.reshape(*grid, classes).transpose(2, 0, 1)  # (C, h, w)
        up = np.einsum("Hh,chw,Ww->cHW", bilinear_matrix(grid[0], mask.shape[0]), maps,
                       bilinear_matrix(grid[1], mask.shape[1]))
        pred, keep = up.argmax(0), (mask != void)
        matrix += np.bincount(classes * mask[keep] + pred[keep], minlength=classes ** 2).reshape(classes, classes)
    tp, gt, predicted = np.diag(matrix), matrix.sum(1), matrix.sum(0)
    union = gt + predicted - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    cost = matrix / np.maximum(gt[:, None] + predicted[None] - matrix, 1e-8)
    rows, cols = linear_sum_assignment(-cost)
    matched = sum(matrix[i, j] / max(gt[i] + predicted[j] - matrix[i, j], 1e-8) for i, j in zip(rows, cols))
    return float(np.nanmean(iou)), float(matched / classes), dict(zip(("sky", "road", "car"), iou.tolist()))


def assert_scores_recomputed(result, *args, **options) -> None:
    """The run's mIoU (both modes) and per-class IoU equal the independent recomputation."""
    miou, reference, per_class = recomputed(*args, **options)
    assert result["miou"] == pytest.approx(miou, abs=1e-9)
    assert result["miou_reference"] == pytest.approx(reference, abs=1e-9)
    assert result["per_class_iou"] == pytest.approx(per_class, abs=1e-9)


def test_hbird_scores_equal_an_independent_recomputation_and_are_reproducible(toy_dataset, tmp_path):
    bank = tmp_path / "bank"
    first = run_hbird(config(toy_dataset, "seed=3", f"memory.path={bank}"))
    assert first["memory"]["rows"] == 36  # n_img = 40 // 6 = 6 per image
    assert_scores_recomputed(first, toy_dataset, bank, 3, (64, 64), False)
    assert first["miou"] > 0.4  # retrieval works: predicting one class everywhere scores at most ~0.17
    again = run_hbird(config(toy_dataset, "seed=3"))
    assert again["miou"] == first["miou"] and again["per_class_iou"] == first["per_class_iou"]
    assert "evaluate_s" in first["timings"]
    other = run_hbird(config(toy_dataset, "seed=4"))
    assert other["memory"]["rows"] == 36


@requires_faiss
def test_exact_faiss_scores_as_exact_torch_search(toy_dataset):
    torch_run = run_hbird(config(toy_dataset, "seed=3"))
    faiss_run = run_hbird(config(toy_dataset, "seed=3", "retrieval.backend=faiss"))
    assert faiss_run["miou"] == torch_run["miou"] and faiss_run["per_class_iou"] == torch_run["per_class_iou"]


def test_original_resolution_evaluation(toy_dataset, tmp_path):
    """eval_resolution=original: the patch votes of a 32x48 input are upsampled to the 64x64 label maps and
    scored there (the masks are not resized)."""
    bank = tmp_path / "bank"
    result = run_hbird(config(toy_dataset, "data.eval_resolution=original", "model.input_size=[32,48]",
                              f"memory.path={bank}"))
    assert_scores_recomputed(result, toy_dataset, bank, 0, (32, 48), True)


def test_cli_build_then_evaluate_and_refuse_other_features(toy_dataset, tmp_path, capsys):
    bank = tmp_path / "bank"
    args = ["--out", str(tmp_path / "build.json"), *TINY, f"data.root={toy_dataset}", f"memory.path={bank}"]
    assert main(["build-memory", *args]) == 0
    assert (bank / "manifest.json").exists()
    assert main(["evaluate", "--out", str(tmp_path / "eval.json"), *TINY, f"data.root={toy_dataset}",
                 f"memory.path={bank}"]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert {"miou", "miou_reference", "per_class_iou", "config", "timings"} <= set(results)
    assert "mIoU" in capsys.readouterr().out
    code = main(["evaluate", *TINY, f"data.root={toy_dataset}", f"memory.path={bank}",
                 "model.name=vit_small_patch16_224"])
    assert code == 2 and "different features" in capsys.readouterr().err


def test_bad_inputs_name_the_culprit_and_keep_finished_shards(toy_dataset, tmp_path, capsys):
    bank = tmp_path / "bank"
    args = [*TINY, f"data.root={toy_dataset}", f"memory.path={bank}"]
    bad = toy_dataset / "images" / "train" / "train004.png"
    good = corrupt(bad)
    assert main(["build-memory", *args]) == 2
    assert "train004.png" in capsys.readouterr().err
    shards = sorted((tmp_path / "bank.partial" / "shards").glob("*.npy"))
    assert len(shards) == 4  # images 0-1 and 2-3 finished before the corrupt one
    before = {p.name: p.read_bytes() for p in shards}
    bad.write_bytes(good)
    assert main(["build-memory", *args]) == 0
    for name, data in before.items():
        assert (bank / "shards" / name).read_bytes() == data

    mask = toy_dataset / "annotations" / "val" / "val001.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
    assert main(["evaluate", *args]) == 2
    assert "val001.png" in capsys.readouterr().err
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(mask)
    assert main(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert "val001.png" in err and "9" in err

    assert main(["hbird", *TINY, f"data.root={tmp_path / 'missing'}"]) == 2
    assert "missing" in capsys.readouterr().err
    (toy_dataset / "images" / "empty").mkdir()
    (toy_dataset / "annotations" / "empty").mkdir()
    assert main(["hbird", *TINY, f"data.root={toy_dataset}", "data.train_split=empty"]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["hbird", *TINY, f"data.root={toy_dataset}", "memory.sise=3"]) == 2
    assert "memory.sise" in capsys.readouterr().err


def test_fungi_features_run_end_to_end_with_support_negatives(toy_dataset):
    plain = run_hbird(config(toy_dataset, "features.kind=fungi"))
    support = run_hbird(config(toy_dataset, "features.kind=fungi", "features.fungi.negatives=support",
                               "features.support.size=60"))
    options = support["features"]["options"]
    assert options["negatives"] == "support" and options["exclude_same_image"] is True
    assert support["features"]["dim"] == plain["features"]["dim"] == 2 * 192
    assert support["memory"]["rows"] == plain["memory"]["rows"] == 36
    assert "support_bank_s" in support["timings"] and 0.0 <= support["miou"] <= 1.0
