"""The package imports in layers: no import cycle between files, none between folders.

Every import statement in ``bksdm_lab`` counts, wherever it is written (module top, inside a function, under
``if TYPE_CHECKING``): ``import bksdm_lab.x.y``, ``from bksdm_lab.x import y`` (the file ``x/y.py`` if there is one,
else the package ``x``) and relative imports. The import Python makes of a package's ``__init__`` before any of its
files is not an edge; only written imports are.

Folder nodes: each subpackage (``common``, ``models``, ``data``, ...) with all the files under it is one node; the
package root's ``bksdm_lab/__init__.py`` is a node of its own (``bksdm_lab``), and so is each top-level command file
(``bksdm_lab/train.py`` is ``bksdm_lab.train``, ``bksdm_lab/evaluate.py`` is ``bksdm_lab.evaluate``, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bksdm_lab"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, packages named without ``.__init__``."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("bksdm_lab", *path.relative_to(PACKAGE).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that the file ``path`` (module ``name``) imports anywhere in its text."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import bksdm_lab.x.y.z` of an attribute: its module
                target = target.rpartition(".")[0]
            if target.startswith("bksdm_lab") and target != name:
                out.add(target)
    return out


def folder(name: str) -> str:
    """``bksdm_lab.data.folder`` -> ``data``; the root ``__init__`` and the top-level command files stay as named."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else name


def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    known = modules()
    files = {name: imported(name, path, known) for name, path in known.items()}
    folders: dict[str, set[str]] = {}
    for name, targets in files.items():
        here = folder(name)
        folders.setdefault(here, set()).update(folder(t) for t in targets if folder(t) != here)
    return files, folders


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each back edge a depth-first search meets (empty when the graph has no cycle)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_every_kind_of_import():
    files, folders = graphs()
    assert "bksdm_lab.models.students" in files["bksdm_lab.models.export"]  # a top-level `from ... import`
    assert "bksdm_lab.models.export" in files["bksdm_lab.evaluation.callback"]  # inside a function
    assert "bksdm_lab.data.folder" in files["bksdm_lab.world.data"]
    assert {"models", "data"} <= folders["distill"] and "bksdm_lab.train" in folders


def test_no_import_cycle_between_files():
    found = cycles(graphs()[0])
    assert not found, "import cycles between files:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_import_cycle_between_folders():
    files, folders = graphs()
    lines = []
    for cycle in cycles(folders):
        lines.append(" -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            lines += [f"    {f} imports {t}" for f, ts in files.items() for t in ts if (folder(f), folder(t)) == (a, b)]
    assert not lines, "import cycles between folders:\n" + "\n".join(lines)
