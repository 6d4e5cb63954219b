"""Layer rules: each building block lives in its layer, the benchmark driver is no toolbox."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from test_layout import PACKAGE, import_graph

ALLOWED_FROM_EVAL = {"hummingbird_fungi.eval.metrics"}


def imports_of(folder: str) -> dict[str, set[str]]:
    """Module -> package modules it imports, for the modules of one sub-package."""
    return {name: targets for name, targets in import_graph().items()
            if name.startswith(f"hummingbird_fungi.{folder}.") or name == f"hummingbird_fungi.{folder}"}


def test_segment_and_retrieval_use_nothing_of_eval_but_the_metrics():
    for folder in ("segment", "retrieval", "memory", "features", "models", "data"):
        for module, targets in imports_of(folder).items():
            reached = {t for t in targets if t.startswith("hummingbird_fungi.eval")} - ALLOWED_FROM_EVAL
            assert not reached, f"{module} imports {sorted(reached)}: only eval.metrics is shared with {folder}/"


def test_the_layer_rule_sees_a_planted_import():
    graph = import_graph()
    assert "hummingbird_fungi.eval.metrics" in graph["hummingbird_fungi.retrieval.predict"]
    assert "hummingbird_fungi.retrieval.predict" in graph["hummingbird_fungi.segment.segmenter"]


def test_the_predict_and_score_loop_is_written_once():
    """Upsampling votes to masks happens in retrieval/predict.py only (the study, the benchmark, the segmenter,
    folders, video and compare_features all call `predict`)."""
    callers = []
    for file in list(PACKAGE.rglob("*.py")) + list((PACKAGE.parent / "tools").glob("*.py")):
        tree = ast.parse(file.read_text())
        calls = {node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                 for node in ast.walk(tree) if isinstance(node, ast.Call)}
        if "upsample_argmax" in calls:
            callers.append(file.relative_to(PACKAGE.parent).as_posix())
    assert callers == ["hummingbird_fungi/retrieval/predict.py"], callers


def test_every_bank_is_built_from_memory_options():
    text = "".join(file.read_text() for file in PACKAGE.rglob("*.py"))
    assert not re.search(r"\bBankSpec\b", text)
    assert not re.search(r"\baugment_epochs\b", text)
