"""Run `hbfungi video` on every sequence of a DAVIS-2016 layout and print per-sequence J (first-frame protocol).

Each sequence is one `hbfungi video --annotate first` call (the first frame's mask is the memory, the
others are scored); a sequence whose summary.json already holds the same settings is read, not rerun.
Prints a table (J per sequence, mean, seconds per predicted frame) per setting and writes it as JSON.

    python tools/davis_video.py --davis ../shared/assets/davis2016 --weights dinov2_vits14_imgfocus.pth \
        --out runs/davis_video --features embeddings --features fungi --propagate 0 --propagate 7 --radius 4

DINOv2 ViT-S/14 (the `hbfungi video` default backbone); --layer names another FUNGI gradient layer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hummingbird_fungi.cli.main import main as hbfungi
from hummingbird_fungi.fileio import write_json
from hummingbird_fungi.models.encoders import VIT_PATCH_LAYER


def setting_name(features: str, propagate: int, radius: int | None, layer: str | None) -> str:
    """Folder name of one setting, e.g. 'fungi_p7_r4' or 'fungi-blocks.-1.attn.proj_p0'."""
    kind = features if layer is None or features != "fungi" else f"{features}-{layer}"
    return f"{kind}_p{propagate}" + ("" if radius is None or not propagate else f"_r{radius}")


def reusable(summary: dict, features: str, propagate: int, radius: int | None, layer: str) -> bool:
    """Whether a finished run has these settings (FUNGI: the same gradient layer)."""
    described = summary["segmenter"]["features"]
    return (summary["propagate"] == propagate and summary["radius"] == (radius if propagate else None)
            and described["kind"] == features and (features != "fungi" or described["options"]["layer"] == layer))


def run_sequence(frames: Path, masks: Path, out: Path, weights: Path, features: str, propagate: int,
                 radius: int | None, layer: str | None, extra: list[str]) -> dict[str, Any]:
    """The summary of one `hbfungi video` run, reusing a finished run of the same settings."""
    summary_path = out / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if reusable(summary, features, propagate, radius, layer or VIT_PATCH_LAYER):
            return summary
    argv = ["video", "--frames", str(frames), "--masks", str(masks), "--out", str(out), "--annotate", "first",
            "--weights", str(weights), "--features", features, "--num-classes", "2", "--ignore-index", "255",
            "--class-names", "background,object", "--propagate", str(propagate), *extra]
    if layer is not None and features == "fungi":
        argv += ["--feature-option", f"layer={layer}"]
    if propagate and radius is not None:
        argv += ["--radius", str(radius)]
    if hbfungi(argv) != 0:
        raise SystemExit(f"hbfungi video failed on {frames}")
    return json.loads(summary_path.read_text())


def main() -> None:
    """Every (features, propagate) setting on every sequence; one table per setting."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--davis", type=Path, required=True, help="folder with JPEGImages/ and Annotations/")
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--features", action="append", choices=("embeddings", "fungi"))
    parser.add_argument("--propagate", action="append", type=int)
    parser.add_argument("--radius", type=int, default=None)
    parser.add_argument("--layer", help="FUNGI gradient layer (default: the backbone's patch layer)")
    parser.add_argument("--sequence", action="append", help="default: every sequence")
    parser.add_argument("extra", nargs="*", help="further `hbfungi video` flags, after --")
    args = parser.parse_args()
    sequences = args.sequence or sorted(p.name for p in (args.davis / "JPEGImages").iterdir() if p.is_dir())
    table: dict[str, Any] = {}
    for features in args.features or ["embeddings"]:
        for propagate in args.propagate or [0]:
            name = setting_name(features, propagate, args.radius, args.layer)
            rows = {}
            for sequence in sequences:
                summary = run_sequence(args.davis / "JPEGImages" / sequence, args.davis / "Annotations" / sequence,
                                       args.out / name / sequence, args.weights, features, propagate, args.radius,
                                       args.layer, args.extra)
                video = summary["video"]
                rows[sequence] = {"j": video["j_mean"], "frames": video["num_scored"],
                                  "s_per_frame": video["seconds_per_predicted_frame"]}
            mean_j = sum(row["j"] for row in rows.values()) / len(rows)
            table[name] = {"sequences": rows, "mean_j": mean_j}
            write_json(args.out / "table.json", table)
    names = list(table)
    width = max(len(name) for name in names) + 2
    print(f"{'sequence':20s}" + "".join(f"{name:>{width}s}" for name in names))
    for sequence in sequences:
        cells = [table[n]["sequences"][sequence] for n in names]
        print(f"{sequence:20s}" + "".join(f"{100 * c['j']:>{width - 8}.1f} ({c['s_per_frame']:.2f}s)" for c in cells))
    print(f"{'mean J':20s}" + "".join(f"{100 * table[n]['mean_j']:>{width - 8}.1f}        " for n in names))

if __name__ == "__main__":
    main()
