"""The data side of a memory-bank build alone (no forward pass): decode + memory transform + label sampling.

Writes the same synthetic Pascal VOC as `tools/bench_eval.py` and reads its train split through the bank
builder's transform (`memory.build.memory_transform`, with and without augmentation) in one process (data
workers 0), then patchifies the masks, draws `--rows` label-aware patches per image (`bank_patches`) and
turns them into soft labels, as the builder does. Prints milliseconds per image of each part and images per
second per core, to set against a forward pass's (`tools/bench_eval.py` prints forward_s_per_img).

    python tools/bench_data.py --images 48 --size 512 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from bench_eval import write_synthetic_voc
from bench_features import emit_json, set_threads
from hummingbird_fungi.config.schema import MemoryOptions
from hummingbird_fungi.data.segmentation import build_dataset, collate
from hummingbird_fungi.memory.build import memory_transform
from hummingbird_fungi.memory.labels import bank_patches, patchify_labels, soft_labels

PATCH = 16  # ViT-S/16's patch, as bench_eval's model


def measure(root: Path, size: int, augment: bool, rows: int) -> dict[str, float]:
    """CPU seconds per image of reading + transform and of label sampling, and images per CPU second."""
    dataset = build_dataset("voc", root, "trainaug")
    memory = MemoryOptions(augment=augment)
    train = dataset.with_transform(memory_transform((size, size), "reference", memory), seed=0)
    loader = DataLoader(train, batch_size=8, num_workers=0, collate_fn=collate)
    read = label = 0.0
    start = time.process_time()
    for batch in loader:
        loaded = time.process_time()
        read += loaded - start
        counts = patchify_labels(batch["mask"], PATCH, dataset.info.num_classes, True)  # (B, N, C)
        for i, index in enumerate(batch["index"]):
            soft_labels(counts[i][bank_patches(counts[i], rows, "label_aware", 0, 0, int(index))])
        start = time.process_time()
        label += start - loaded
    count = len(train)
    return {"augment": augment, "read_transform_ms": 1000 * read / count, "labels_ms": 1000 * label / count,
            "images_per_s": count / (read + label)}


def main() -> None:
    """Measure with and without augmentation; print and optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rows", type=int, default=100, help="bank rows drawn per image")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as folder:
        write_synthetic_voc(Path(folder), args.images, 1, args.size)
        rows = [measure(Path(folder), args.size, augment, args.rows) for augment in (True, False)]
    for row in rows:
        print(f"augment={row['augment']}: read+transform {row['read_transform_ms']:.1f} ms/img, labels+sampling "
              f"{row['labels_ms']:.1f} ms/img, {row['images_per_s']:.1f} images/s per core")
    emit_json(rows, args.json)


if __name__ == "__main__":
    main()
