"""Compare feature kinds and video protocols on a DAVIS folder: one `hbfungi video --davis` run per feature kind
(its protocols share one feature extraction per sequence), then one table of J&F, J and F per sequence.

A kind whose `<out>/<kind>/summary.json` already holds the asked protocols is read, not rerun.

    python tools/davis_video.py --davis ../shared/assets/davis2016 --out runs/davis \
        --features embeddings --features fungi --protocol first dino -- \
        --weights dinov2_vits14_imgfocus.pth --resolution 480 --device cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hummingbird_fungi.cli.main import main as hbfungi
from hummingbird_fungi.fileio import write_json


def run_kind(davis: Path, out: Path, features: str, protocols: list[str], extra: list[str]) -> dict[str, Any]:
    """The summary of `hbfungi video --davis` with one feature kind, reusing a finished run of these protocols."""
    summary_path = out / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if list(summary["protocols"]) == protocols and summary["segmenter"]["features"]["kind"] == features:
            return summary
    argv = ["video", "--davis", str(davis), "--out", str(out), "--protocol", *protocols, "--features", features,
            *extra]
    if hbfungi(argv) != 0:
        raise SystemExit(f"hbfungi video --davis failed for {features} features")
    return json.loads(summary_path.read_text())


def main() -> None:
    """Every feature kind with every protocol; one table (J&F / J / F in %, frames per second)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--davis", type=Path, required=True, help="DAVIS folder (JPEGImages/, Annotations/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--features", action="append", choices=("embeddings", "fungi"))
    parser.add_argument("--protocol", nargs="+", default=["first", "dino"])
    parser.add_argument("extra", nargs="*", help="further `hbfungi video` flags, after --")
    args = parser.parse_args()
    columns: dict[str, dict[str, Any]] = {}
    for features in args.features or ["embeddings"]:
        summary = run_kind(args.davis, args.out / features, features, args.protocol, args.extra)
        for name, protocol in summary["protocols"].items():
            columns[f"{features}/{name}"] = {**protocol["sequences"], "mean": protocol["mean"]}
    write_json(args.out / "table.json", columns)
    names = list(columns)
    print("| sequence | " + " | ".join(f"{name} J&F / J / F (fps)" for name in names) + " |")
    print("|---|" + "---|" * len(names))
    for sequence in columns[names[0]]:
        cells = [columns[name][sequence] for name in names]
        print(f"| {sequence} | " + " | ".join(
            f"{100 * c['jf_mean']:.1f} / {100 * c['j_mean']:.1f} / {100 * c['f_mean']:.1f} ({c['frames_per_s']:.2f})"
            for c in cells) + " |")


if __name__ == "__main__":
    main()
