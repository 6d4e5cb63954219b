"""Package layout rules: no import cycles (also through function-level imports), documented folders."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hummingbird_fungi"


def module_names() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    names = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports anywhere in its body (module level or inside functions)."""
    names = module_names()
    graph = {}
    for name, file in names.items():
        targets = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hummingbird_fungi"):
                targets |= {f"{node.module}.{alias.name}" for alias in node.names} & set(names)
                targets |= {node.module} & set(names)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names} & set(names)
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target] if target in path else [node, target]
            if target not in state:
                found = visit(target, path + [target])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["hummingbird_fungi.eval.hbird"]  # the walk sees the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_package_folder_says_what_it_is_for():
    for init in PACKAGE.rglob("__init__.py"):
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring and len(docstring.split()) >= 12, f"{init} needs a one-paragraph docstring"


def test_code_cites_only_documents_in_the_repository():
    cited = re.compile(r"\bspec(?:s)? ?(?:sections? )?\d+(?:\.\d+)?", re.IGNORECASE)
    for file in list(PACKAGE.rglob("*.py")) + list((PACKAGE.parent / "configs").glob("*.yaml")):
        assert not cited.search(file.read_text()), f"{file} cites a section of a document users do not have"
    for reference in re.findall(r"docs/[\w.-]+\.md", "".join(f.read_text() for f in PACKAGE.rglob("*.py"))):
        assert (PACKAGE.parent / reference).is_file(), reference
