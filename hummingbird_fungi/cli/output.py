"""What the commands print and write: metric lines on stdout, results JSON files."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ProgressSafeHandler(logging.StreamHandler):
    """Writes log records through tqdm when it is loaded, so they never land on a progress bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # the current stderr (it may have been replaced since the handler was made)
        if "tqdm" not in sys.modules:
            super().emit(record)
            return
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(level: int) -> None:
    """Show the toolkit's own records (`hummingbird_fungi.*`) from `level` on stderr; other libraries' INFO
    lines (faiss's loader, ...) stay hidden, as the root logger keeps its WARNING level."""
    package = logging.getLogger("hummingbird_fungi")
    package.setLevel(level)
    root = logging.getLogger()
    if not any(isinstance(h, ProgressSafeHandler) for h in root.handlers):
        handler = ProgressSafeHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(logging.Filter("hummingbird_fungi"))
        root.addHandler(handler)


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
    if percent(results["miou"]) == "n/a":
        print("mIoU n/a: no ground-truth pixel was scored (all void or outside the label space)")
        return
    print(f"mIoU {percent(results['miou'])} (standard) | {percent(results['miou_reference'])} (reference)")
    for name, iou in results.get("per_class_iou", {}).items():
        print(f"  {name:>20s}  {'-' if iou is None else percent(iou)}")


def percent(value: float | None) -> str:
    """A fraction as '12.34', or 'n/a' for None and NaN."""
    return "n/a" if value is None or value != value else f"{100 * value:.2f}"
