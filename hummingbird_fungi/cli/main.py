"""`hbfungi` command line: presets plus dotted key=value overrides for every stage.

Only argparse and the typed schema are imported to build the parser (`--help` answers at once);
each command imports what it runs.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from hummingbird_fungi import __version__
from hummingbird_fungi.cli.output import print_metrics, setup_logging, write_results
from hummingbird_fungi.errors import BankMismatchError, ConfigError, DataError
from hummingbird_fungi.registry import Registry

log = logging.getLogger("hummingbird_fungi")
EXAMPLES = {
    "hbird": "hbfungi hbird --config camvid_dinov2_vits14 --out r.json data.root=camvid model.weights=w.pth",
    "build-memory": "hbfungi build-memory --config ade20k_dino_vitb16_mem1e3 memory.path=banks/ade data.root=ADE",
    "evaluate": "hbfungi evaluate --config ade20k_dino_vitb16_mem1e3 memory.path=banks/ade data.root=ADE",
    "knn": "hbfungi knn --config knn_digits_dinov2_vits14 --out r.json model.weights=w.pth",
    "tune": "hbfungi tune --config camvid_dinov2_vits14 --out tuned.yaml data.root=camvid model.weights=w.pth",
}


def add_config_args(parser: argparse.ArgumentParser, command: str) -> None:
    """--config, --out, --seed, --device and the trailing overrides of `command`."""
    parser.add_argument("--config", help="a shipped preset by name (see `hbfungi configs`) or a YAML file")
    parser.add_argument("--out", type=Path, required=command == "tune",
                        help="the tuned preset (YAML) to write" if command == "tune" else "results JSON to write")
    parser.add_argument("--seed", type=int, help="seed for every random choice (same as seed=N)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 or auto (same as device=...)")
    if command == "tune":
        add_tune_args(parser)
    if command in ("hbird", "evaluate"):
        parser.add_argument("--per-image", type=Path, metavar="FILE.npz",
                            help="also write each eval image's confusion matrix (for `hbfungi compare`)")
    example = "knn.k=10" if command == "knn" else "memory.size=null"
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"dotted overrides, e.g. data.root=DIR model.weights=FILE {example} (every key below)")


def add_tune_args(parser: argparse.ArgumentParser) -> None:
    """The results file of `hbfungi tune` and its grid's keys (tune.* overrides, TuneOptions) in the help."""
    from hummingbird_fungi.config.schema import TuneOptions

    parser.add_argument("--results", type=Path, metavar="FILE.json", help="also write the whole grid as JSON")
    rows = TuneOptions().describe("tune.")
    width = max(len(key) for key, _, _ in rows)
    parser.epilog = "grid keys (tune.key=value overrides):\n" + "\n".join(
        f"  {key:<{width}}  {as_yaml(value)}  {doc}" for key, value, doc in rows) + "\n\n" + (parser.epilog or "")


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

    check_per_image(args)
    results = run_hbird(config_from_args(args), args.out, args.per_image)
    print_metrics(results)
    write_results(pop_per_image(results, args.per_image), args.out)


def cmd_build_memory(args: argparse.Namespace) -> None:
    """Build and save a memory bank."""
    from hummingbird_fungi.eval.hbird import run_build_memory

    results = run_build_memory(config_from_args(args), args.out)
    print(f"memory bank {results['path']}: {results['memory']['rows']} rows x {results['memory']['dim']}")
    write_results(results, args.out)


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Evaluate with a saved memory bank."""
    from hummingbird_fungi.eval.hbird import run_evaluate

    check_per_image(args)
    results = run_evaluate(config_from_args(args), args.out, args.per_image)
    print_metrics(results)
    write_results(pop_per_image(results, args.per_image), args.out)


def check_per_image(args: argparse.Namespace) -> None:
    """--per-image and --out name two different files."""
    if args.per_image is not None and args.out is not None and args.per_image.resolve() == args.out.resolve():
        raise ConfigError(f"--per-image and --out are the same file {args.out}")


def pop_per_image(results: dict, path: Path | None) -> dict:
    """Write the per-image keys and confusion matrices of `results` to `path` (.npz) and leave its name in their
    place; results without them are returned as they are."""
    import numpy as np

    from hummingbird_fungi.distributed import is_main
    from hummingbird_fungi.fileio import save_npz_atomic

    if "per_image_keys" not in results:
        return results
    keys, matrices = results.pop("per_image_keys"), results.pop("per_image_confusions")
    if is_main():
        save_npz_atomic(path, keys=np.array(keys), confusions=matrices, miou=np.array(results["miou"]))
        log.info("per-image confusion matrices written to %s", path)
    return {**results, "per_image": str(path)}


def cmd_tune(args: argparse.Namespace) -> None:
    """Tune on held-out memory images, print the table, write the tuned preset."""
    from hummingbird_fungi.config.loader import overrides_to_dict
    from hummingbird_fungi.config.schema import TuneOptions
    from hummingbird_fungi.eval.hbird import check_run_paths
    from hummingbird_fungi.eval.tune import format_table, tune, write_preset
    from hummingbird_fungi.fileio import check_no_overlap, preflight
    from hummingbird_fungi.runtime import versions

    grid = [item for item in args.overrides if item.startswith("tune.")]
    args.overrides = [item for item in args.overrides if not item.startswith("tune.")]
    options = TuneOptions.from_mapping(overrides_to_dict(grid).get("tune", {}))
    config = config_from_args(args)
    if args.out.exists():
        raise ConfigError(f"--out {args.out} exists; the tuned preset is never written over a file")
    preflight({}, {"--results": (args.results, "file")})
    check_no_overlap({"--out": args.out, "--results": args.results}, {"--config": args.config})
    check_run_paths(config, args.out)
    tuning = tune(config, options)
    print(format_table(tuning))
    write_preset(args.out, tuning.apply(config), tuning, args.config)
    print(f"tuned preset written to {args.out} (use it as --config {args.out})")
    write_results({**tuning.summary(), "options": options.to_dict(), "config": config.to_dict(),
                   "versions": versions()}, args.results)


def cmd_compare(args: argparse.Namespace) -> None:
    """Paired bootstrap intervals of runs against the first (their --per-image files), printed and written."""
    from hummingbird_fungi.eval.bootstrap import compare_runs, format_comparison, read_per_image

    runs = {path.stem: read_per_image(path) for path in args.runs}
    if len(runs) != len(args.runs):
        raise ConfigError("two --per-image files share a name; give each run its own file name")
    rows = compare_runs(runs, args.resamples, args.seed, args.level)
    print(format_comparison(rows, args.level))
    write_results({"runs": {name: str(path) for name, path in zip(runs, args.runs)}, "rows": rows,
                   "resamples": args.resamples, "seed": args.seed, "level": args.level}, args.out)


def print_names(rows: dict[str, str], indent: str = "") -> None:
    """One `name  description` line per row, descriptions aligned."""
    width = max(map(len, rows), default=0)
    for name, description in rows.items():
        print(f"{indent}{name:<{width}}  {description}".rstrip())


def cmd_configs(args: argparse.Namespace) -> None:
    """List the shipped presets with what each is for."""
    from hummingbird_fungi.config.loader import preset_description, presets

    print_names({name: preset_description(path) for name, path in presets().items()})


def registries(what: str) -> dict[str, Registry[Any]]:
    """The registries behind `hbfungi list WHAT` (datasets, backends, objectives, features), by label."""
    from hummingbird_fungi.data.classification import CLASSIFICATION_DATASETS
    from hummingbird_fungi.data.segmentation import SEGMENTATION_DATASETS
    from hummingbird_fungi.features import PATCH_FEATURES
    from hummingbird_fungi.features.fungi_image import IMAGE_OBJECTIVES
    from hummingbird_fungi.features.fungi_patch import PATCH_OBJECTIVES
    from hummingbird_fungi.retrieval.indexes import BACKENDS

    return {
        "datasets": {"segmentation (data.kind of hbird, build-memory, evaluate)": SEGMENTATION_DATASETS,
                     "classification (data.kind of knn)": CLASSIFICATION_DATASETS},
        "backends": {"retrieval.backend": BACKENDS},
        "objectives": {"patch (features.fungi.objective)": PATCH_OBJECTIVES,
                       "image (features.objectives of knn)": IMAGE_OBJECTIVES},
        "features": {"features.kind": PATCH_FEATURES},
    }[what]


def summary(factory: object) -> str:
    """The first paragraph of a registered factory's docstring, on one line ('' if it has none)."""
    doc = inspect.getdoc(getattr(factory, "func", factory)) or ""  # a functools.partial: its function's
    return " ".join(doc.split("\n\n")[0].split())


def cmd_list(args: argparse.Namespace) -> None:
    """Print the registered names of one kind, one a line with what it is (presets: as `hbfungi configs`)."""
    if args.what == "presets":
        cmd_configs(args)
        return
    groups = registries(args.what)
    indent = "  " if len(groups) > 1 else ""
    for label, registry in groups.items():
        if indent:
            print(f"{label}:")
        print_names({name: summary(registry.get(name)) for name in registry.names()}, indent)


def cmd_config_show(args: argparse.Namespace) -> None:
    """Print a preset merged with overrides, validated, one key a line with its description."""
    from hummingbird_fungi.config.loader import read_preset

    schema = schema_of(args.command_name or ("knn" if "knn" in read_preset(args.name) else "hbird"))
    args.config, args.seed, args.device = args.name, None, None
    config = config_from_args(args, schema)
    rows = config.describe()
    width = max(len(f"{key}: {as_yaml(value)}") for key, value, _ in rows)
    for key, value, doc in rows:
        text = f"{key}: {as_yaml(value)}"
        print(f"{text:<{width}}  # {doc}" if doc else text)


def as_yaml(value: object) -> str:
    """A value as it is written in a preset or an override (null, true, [a, b])."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()


def schema_of(command: str) -> type:
    """The typed schema of a command's configuration."""
    from hummingbird_fungi.config.schema import HbirdConfig, KnnConfig

    return KnnConfig if command == "knn" else HbirdConfig


def key_help(command: str) -> str:
    """An epilog listing every configuration key of a command with its default, and an example."""
    rows = schema_of(command)().describe()
    width = max(len(key) for key, _, _ in rows)
    lines = [f"  {key:<{width}}  {as_yaml(value)}  {doc}".rstrip() for key, value, doc in rows]
    return "configuration keys (key=value after the options; default, meaning):\n" + "\n".join(lines) + \
        f"\n\nexample:\n  {EXAMPLES[command]}"


def cmd_knn(args: argparse.Namespace) -> None:
    """Image-level kNN classification with embeddings and FUNGI features."""
    from hummingbird_fungi.eval.knn_run import format_table, run_knn
    from hummingbird_fungi.fileio import check_no_overlap, preflight

    config = config_from_args(args, schema_of("knn"))
    # before the features are computed, not after; data.root may be a folder a torchvision dataset creates
    preflight({"model.weights": (config.model.weights, "file")}, {"--out": (args.out, "file")})
    check_no_overlap({"--out": args.out}, {"data.root": config.data.root})
    results = run_knn(config)
    print(format_table(results["results"]))
    write_results(results, args.out)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "hbird": (cmd_hbird, "build the memory bank (or reuse memory.path) and evaluate"),
    "build-memory": (cmd_build_memory, "build a memory bank and save it at memory.path"),
    "evaluate": (cmd_evaluate, "evaluate with the memory bank at memory.path"),
    "knn": (cmd_knn, "image-level kNN classification (embeddings and FUNGI)"),
    "tune": (cmd_tune, "tune features, transform, k and temperature on held-out memory images; write a preset"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per stage."""
    from hummingbird_fungi.cli.segment import add_segment_commands

    parser = argparse.ArgumentParser(prog="hbfungi", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"hbfungi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text, epilog=key_help(name),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_args(child, name)
        child.set_defaults(func=func)
    add_segment_commands(sub)
    listing = sub.add_parser("configs", help="list the shipped presets", description="List the shipped presets.")
    listing.set_defaults(func=cmd_configs)
    names = sub.add_parser("list", help="list the registered names of one kind",
                           description="List the registered names of one kind (what config keys accept).")
    names.add_argument("what", choices=("datasets", "backends", "objectives", "presets", "features"),
                       help="which names: data.kind, retrieval.backend, the FUNGI objectives, --config, features.kind")
    names.set_defaults(func=cmd_list)
    comparison = sub.add_parser("compare", help="paired bootstrap intervals of runs against the first",
                                description="Paired bootstrap intervals (over images) of each run's mIoU against the "
                                            "first run's, from the files `hbird|evaluate --per-image` wrote.")
    comparison.add_argument("runs", nargs="+", type=Path, metavar="RUN.npz", help="baseline first, then the others")
    comparison.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    comparison.add_argument("--seed", type=int, default=0, help="seed of the resamples")
    comparison.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    comparison.add_argument("--out", type=Path, help="results JSON to write")
    comparison.set_defaults(func=cmd_compare)
    config = sub.add_parser("config", help="show a preset merged with overrides",
                            description="Show a configuration: a preset (or YAML file) merged with overrides, "
                                        "validated, every key with its description.")
    actions = config.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="print the merged, validated configuration",
                              description="Print the merged, validated configuration, one key a line.")
    show.add_argument("name", help="preset name or YAML file")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    show.add_argument("--command", dest="command_name", choices=("hbird", "knn"),
                      help="whose schema (default: knn for presets with a knn section)")
    show.set_defaults(func=cmd_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hbfungi` console script."""
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        args.func(args)
    except (ConfigError, DataError, BankMismatchError) as exc:
        close_progress_bars()
        print(f"hbfungi: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout went away (`hbfungi configs | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def close_progress_bars() -> None:
    """End any progress bar left open by an error, so the message starts on its own line."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(tqdm._instances):  # noqa: SLF001 - tqdm keeps its open bars there
            bar.close()


if __name__ == "__main__":
    sys.exit(main())
