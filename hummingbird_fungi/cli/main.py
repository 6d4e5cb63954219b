"""`hbfungi` command line: presets plus dotted key=value overrides for every stage."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from hummingbird_fungi.cli.output import print_metrics, write_results
from hummingbird_fungi.errors import BankMismatchError, ConfigError, DataError

log = logging.getLogger("hummingbird_fungi")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config, --out, --seed, --device and the trailing overrides."""
    parser.add_argument("--config", type=Path, help="YAML preset (see configs/)")
    parser.add_argument("--out", type=Path, help="results JSON to write")
    parser.add_argument("--seed", type=int, help="seed for every random choice (same as seed=N)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 or auto (same as device=...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. data.root=DIR model.weights=FILE memory.size=null")


def config_from_args(args: argparse.Namespace, schema: type | None = None):  # noqa: ANN201 - a schema instance
    """Preset + overrides (+ --seed/--device) -> the validated, typed config (`HbirdConfig` by default)."""
    from hummingbird_fungi.config.loader import load_config
    from hummingbird_fungi.config.schema import HbirdConfig
    from hummingbird_fungi.distributed import init_from_env

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    config = load_config(args.config, overrides, schema=schema or HbirdConfig)
    config.device = init_from_env(config.device)
    return config


def cmd_hbird(args: argparse.Namespace) -> None:
    """Build (or reuse) the memory bank, then evaluate."""
    from hummingbird_fungi.eval.hbird import run_hbird

    results = run_hbird(config_from_args(args))
    print_metrics(results)
    write_results(results, args.out)


def cmd_build_memory(args: argparse.Namespace) -> None:
    """Build and save a memory bank."""
    from hummingbird_fungi.eval.hbird import run_build_memory

    results = run_build_memory(config_from_args(args))
    print(f"memory bank {results['path']}: {results['memory']['rows']} rows x {results['memory']['dim']}")
    write_results(results, args.out)


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Evaluate with a saved memory bank."""
    from hummingbird_fungi.eval.hbird import run_evaluate

    results = run_evaluate(config_from_args(args))
    print_metrics(results)
    write_results(results, args.out)


def cmd_knn(args: argparse.Namespace) -> None:
    """Image-level kNN classification with embeddings and FUNGI features."""
    from hummingbird_fungi.config.schema import KnnConfig
    from hummingbird_fungi.eval.knn_run import format_table, run_knn

    results = run_knn(config_from_args(args, KnnConfig))
    print(format_table(results["results"]))
    write_results(results, args.out)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "hbird": (cmd_hbird, "build the memory bank (or reuse memory.path) and evaluate"),
    "build-memory": (cmd_build_memory, "build a memory bank and save it at memory.path"),
    "evaluate": (cmd_evaluate, "evaluate with the memory bank at memory.path"),
    "knn": (cmd_knn, "image-level kNN classification (embeddings and FUNGI)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per stage."""
    from hummingbird_fungi.cli.segment import add_segment_commands

    parser = argparse.ArgumentParser(prog="hbfungi", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        add_config_args(child)
        child.set_defaults(func=func)
    add_segment_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hbfungi` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ConfigError, DataError, BankMismatchError) as exc:
        print(f"hbfungi: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
