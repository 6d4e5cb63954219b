"""CamVid train -> val through `hbird_evaluation` with a checkpoint loaded into a plain timm module.

Shows the bring-your-own-model path on real data: the script builds the ViT with timm itself,
loads the state dict, and hands the module to `hbird_evaluation` with open-hummingbird-eval's
argument names. The settings equal the preset camvid_dinov2_vits14 (H x W 336 x 448, every train patch,
no augmentation, exact search, k=30, T=0.02, ImageNet std), so the figures match `hbfungi hbird`
with that preset.

    python tools/hbird_camvid.py --root CAMVID_ROOT \
        --weights dinov2_vits14.pth --out runs/hbird_camvid.json [--fungi]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import timm
import torch

from hummingbird_fungi import FeatureOptions, MemoryOptions, hbird_evaluation
from hummingbird_fungi.fileio import write_json


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="CamVid root (images/, annotations/, dataset.yaml)")
    parser.add_argument("--weights", type=Path, required=True, help="DINOv2 ViT-S/14 state dict in timm layout")
    parser.add_argument("--arch", default="vit_small_patch14_dinov2", help="timm architecture of the weights")
    parser.add_argument("--fungi", action="store_true", help="FUNGI features (default projection: structured)")
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    """Load the checkpoint into timm, evaluate with hbird_evaluation, print and write the figures."""
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = timm.create_model(args.arch, pretrained=False, num_classes=0, img_size=518)
    model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True), strict=True)
    features = FeatureOptions(kind="fungi" if args.fungi else "embeddings")
    miou, details = hbird_evaluation(
        model, d_model=model.embed_dim, patch_size=model.patch_embed.patch_size[0], dataset_name="folder",
        data_dir=str(args.root), batch_size=args.batch_size, input_size=[336, 448], augmentation_epoch=1,
        device="auto", return_knn_details=True, n_neighbours=30, nn_method="torch", memory_size=None,
        num_workers=args.num_workers, memory=MemoryOptions(size=None, augment=False), normalize="imagenet",
        features=features)
    print(f"CamVid val ({features.kind}): mIoU {100 * details['miou']:.2f} (standard) | {100 * miou:.2f} "
          f"(reference, what hbird_evaluation returns); {details['memory']['rows']} memory rows, "
          f"{details['timings']['total_s']:.0f} s")
    if args.out is not None:
        write_json(args.out, details)


if __name__ == "__main__":
    main()
