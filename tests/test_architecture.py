"""The package's shape (docs/architecture.md): no two files of dico/ import each other, directly or round a circle,
each floor imports only the floors below it, and the release catalogue builds nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "dico"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str], outside: bool = False) -> set[str]:
    """The dico modules a file imports anywhere in it (inside functions too): ``import a.b``, ``from a import b``
    (``a.b`` when that is a module, else ``a``) and relative imports; with ``outside``, also the top-level names
    of what it imports from outside dico (``lightning``, ``cli``, ...)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m != name and (m in known or (outside and m and not m.startswith("dico")))}


def import_graph(outside: bool = False, package: Path = PACKAGE) -> dict[str, set[str]]:
    files = sorted(package.rglob("*.py"))
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known, outside) for p in files}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (circle := visit(start)):
            return circle
    return None


def test_the_graph_reader_sees_a_circle_and_relative_imports():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "dico.models.blocks" in graph["dico.models.dit"]  # `from .blocks import DiCoBlock`
    assert "dico.checkpoints" in graph["dico.module"]  # a function-level import counts


def test_no_file_circle_in_dico_or_the_ablation_runner():
    """Package faces (``__init__.py`` re-exports) count as files: a circle through one is a circle too. The runner's
    modules (ablations/) keep the same rule: one job per file, none importing back (type-only imports count)."""
    assert find_circle(import_graph()) is None
    runner = import_graph(package=ROOT / "ablations")
    assert "ablations.report" in runner["ablations.status"] and "ablations.curves" in runner["ablations.report"]
    assert find_circle(runner) is None


def test_the_release_catalogue_builds_nothing():
    graph = import_graph()
    assert "dico.module" not in graph["dico.pretrained"] and "dico.sample_jobs" not in graph["dico.pretrained"]
    assert "dico.checkpoints" not in graph["dico.pretrained"]  # checkpoints resolve release names, not the reverse
    assert "dico.module" not in graph["dico.checkpoints"]


def part_of(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# (whose imports, what they may not import, why): docs/architecture.md states them.
FORBIDDEN = [
    ("dico.models", ["dico.diffusion", "lightning", "wandb", "torch_fidelity"], "pure torch, no sampler"),
    ("dico.diffusion", ["dico.models", "lightning", "wandb", "torch_fidelity"], "takes the model as a callable"),
    ("dico.data", ["dico.models", "dico.diffusion", "dico.evaluation"], "the floor below evaluation"),
    ("dico", ["cli", "ablations", "benchmarks", "notebooks"], "the package is imported by them, never the reverse"),
    ("dico.profiling", ["dico"], "a leaf"),
    ("dico.models.ablation", ["dico.shape_search"], "the variant table is data; the search imports it"),
]


def broken_rules(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {target} ({why})"
        for owner, forbidden, why in FORBIDDEN
        for module, targets in sorted(graph.items())
        if part_of(module, owner)
        for target in sorted(targets)
        if any(part_of(target, f) and not part_of(target, owner) for f in forbidden)
    ]


def test_each_floor_imports_only_what_docs_architecture_allows():
    graph = import_graph(outside=True)
    assert "lightning" in {t.split(".")[0] for t in graph["dico.module"]}  # outside imports are seen
    assert broken_rules({"dico.models.dico": {"lightning.pytorch"}, "dico.data.x": {"dico.evaluation.fidelity"}})
    assert not broken_rules(graph), broken_rules(graph)


def private_attributes_written(path: Path) -> list[str]:
    """``obj._name = ...`` (also augmented and annotated) in a file, for any ``obj`` but ``self`` and ``cls``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = node.targets if isinstance(node, ast.Assign) else []
        targets += [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in (t for top in targets for t in ast.walk(top)):
            if not isinstance(target, ast.Attribute) or not target.attr.startswith("_") or target.attr.startswith("__"):
                continue
            if not (isinstance(target.value, ast.Name) and target.value.id in ("self", "cls")):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(target)}")
    return found


def test_no_module_writes_another_objects_private_attribute(tmp_path):
    """An object's private state is its own: only ``dico/compat.py``, the one home of Lightning internals (checked
    against the installed Lightning by test_compat.py), sets one of Lightning's."""
    example = tmp_path / "example.py"
    example.write_text("def f(module, self):\n    module._weights = 1\n    self._mine = 2\n    module.public = 3\n")
    assert private_attributes_written(example) == ["example.py:2 module._weights"]
    written = [s for p in sorted(PACKAGE.rglob("*.py")) if p.name != "compat.py" for s in private_attributes_written(p)]
    assert written == []


# The formatter's skip markers outside tests/: kept only where ruff's layout reads worse (a table, an argv of flag/value
# pairs), each followed on its line by a second comment with the reason (a form ruff still honours). 171 before issue
# 29, 27 after.
FMT_SKIP_CEILING = 8
TESTS_FMT_SKIP_CEILING = 0  # tests are laid out by ruff, argv lists included
FMT_MARKER = re.compile(r"#\s*fmt:\s*(?:skip|off)\b(.*)$")


def fmt_skip_markers(paths: list[Path], root: Path = ROOT) -> list[tuple[str, bool]]:
    """(``file:line``, whether the marker gives a reason) for each ``# fmt: skip`` / ``# fmt: off`` in the files."""
    return [
        (f"{p.relative_to(root).as_posix()}:{n}", bool(re.match(r"\s+#\s*\S", m.group(1))))
        for p in paths
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if (m := FMT_MARKER.search(line))
    ]


def test_each_fmt_skip_gives_its_reason_and_they_stay_few(tmp_path):
    example = tmp_path / "example.py"
    example.write_text("A = [1,  2]  # fmt: skip\nB = [1,  2]  # fmt: skip  # aligned\nC = 1\n")
    assert [ok for _, ok in fmt_skip_markers([example], tmp_path)] == [False, True]
    folders = ("dico", "ablations", "benchmarks")
    files = [ROOT / "cli.py", *(p for d in folders for p in sorted((ROOT / d).rglob("*.py")))]
    markers = fmt_skip_markers(files)
    assert len(markers) <= FMT_SKIP_CEILING, f"{len(markers)} markers: let ruff format the code instead"
    tests = fmt_skip_markers([p for p in sorted((ROOT / "tests").rglob("*.py")) if p.name != Path(__file__).name])
    assert len(tests) <= TESTS_FMT_SKIP_CEILING, f"{len(tests)} markers in tests/: let ruff format the code instead"
    bare = [where for where, ok in markers + tests if not ok]
    assert bare == [], "give each its reason: `# fmt: skip  # why ruff's layout reads worse here`"
