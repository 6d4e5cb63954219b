"""What the commands print and write: metric lines on stdout, results JSON files."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def write_results(results: dict, out: Path | None) -> None:
    """Write the results JSON (strict, atomic) on the main rank and log where."""
    from hummingbird_fungi.distributed import is_main
    from hummingbird_fungi.fileio import write_json

    if out is None or not is_main():
        return
    log.info("results written to %s", write_json(out, results))


def print_metrics(results: dict) -> None:
    """One-line metric summary plus per-class IoU on stdout."""
    from hummingbird_fungi.distributed import is_main

    if "miou" not in results or not is_main():
        return
    print(f"mIoU {100 * results['miou']:.2f} (standard) | {100 * results['miou_reference']:.2f} (reference)")
    for name, iou in results.get("per_class_iou", {}).items():
        print(f"  {name:>20s}  {'-' if iou is None else f'{100 * iou:.2f}'}")
