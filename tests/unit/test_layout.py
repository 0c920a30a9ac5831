"""The house rules of the layout (DESIGN's wing rule), read from the source itself."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("datasites", "researcher", "policies")
WINGS = {"datasites": "researcher", "researcher": "datasites"}  # each wing, and the other


def _walk_runtime(node: ast.AST):  # noqa: ANN202
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
            continue
        yield from _walk_runtime(child)


def _imports(package: str) -> dict[str, set[str]]:
    """Module -> the modules it imports at run time, at module level or inside functions."""
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        nodes = list(_walk_runtime(ast.parse(path.read_text())))
        names = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)  # and ``from pkg import module`` names the module too
                names |= {f"{node.module}.{a.name}" for a in node.names}
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[module.removesuffix(".__init__")] = names
    return found


def _roots(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_the_wings_never_import_each_other() -> None:
    for module, names in _imports("researcher").items():
        assert "datasites" not in _roots(names), module
    for module, names in _imports("datasites").items():
        assert "researcher" not in _roots(names), module


def test_policies_is_the_syft_free_contract_of_both_wings() -> None:
    for module, names in _imports("policies").items():
        assert not _roots(names) & {"syft", "datasites", "researcher"}, module
    kept = {p.stem for p in (ROOT / "policies").glob("*.py")} - {"__init__"}
    assert {"plan", "modelspec", "torch_model", "wire", "privacy", "accounting"} <= kept
    engine = {p.stem for p in (ROOT / "policies" / "engine").glob("*.py")}
    assert {"prepare", "round_task", "dp_sgd", "mock_round"} <= engine  # one round on a table
    assert not kept & {"ledger", "audit", "store", "access", "report", "codecheck"}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes in ``tree``: prose may say what syft does, code may not."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = body[0] if body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _names_in_code(tree: ast.AST) -> set[str]:
    """Every identifier and string the code of ``tree`` spells, docstrings left out."""
    prose = _docstrings(tree)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in prose:
                names.add(node.value)
        elif isinstance(node, ast.alias):
            names |= {node.name, node.asname or ""}
        else:
            for field in ("id", "attr", "name", "arg", "module"):
                value = getattr(node, field, None)
                if isinstance(value, str):
                    names.add(value)
    return names


def test_policies_neither_imports_nor_names_syft() -> None:
    """syft's knowledge (its classes, error names, private attributes) lives in each wing's
    adapter (``researcher.syft_adapter``, ``datasites.serving.syft_client``), not in the
    contract: ``policies.tls`` once patched syft's HTTPConnection, ``policies.errors`` once
    recognised SyftError by name."""
    for path in (ROOT / "policies").rglob("*.py"):
        spelled = _names_in_code(ast.parse(path.read_text()))
        assert not [n for n in spelled if "syft" in n.lower()], path.relative_to(ROOT)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: each strongly connected group of modules, or a module
    that imports itself (Tarjan's algorithm, iterative: the graph has some 200 modules)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in graph[node]:
                    found.append(sorted(group))
    return found


def test_no_import_cycle_anywhere() -> None:
    """Every import, at module level or inside a function, of every package, policies included.

    A lazy import inside a function hides a cycle from Python but not from a maintainer:
    ``policies.errors`` -> ``policies.tls`` -> ``policies.errors`` was one, and
    ``runtime`` -> ``site_job`` -> ``runtime`` before it."""
    imports: dict[str, set[str]] = {}
    for package in PACKAGES:
        imports |= _imports(package)
    graph = {m: {n for n in names if n in imports} for m, names in imports.items()}
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


_BY_STRING = {"import_module", "__import__", "find_spec", "run_module", "spec_from_file_location"}


def _string_reaches(package: str) -> list[str]:
    """``import_module("x")``-like calls naming another package's module, in ``package``."""
    others = {WINGS[package]} if package in WINGS else set(WINGS)
    found = []
    for path in (ROOT / package).rglob("*.py"):
        for node in _walk_runtime(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            texts = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if name in _BY_STRING and any(
                isinstance(t, str) and t.split(".")[0] in others for t in texts
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_import_by_string_across_the_wings() -> None:
    """An import by string is invisible to the rules above; none crosses to the other wing."""
    for package in PACKAGES:
        assert _string_reaches(package) == [], package


_DRY_RUN = """
import contextlib, sys, types
from pathlib import Path
import numpy as np, pandas as pd

rng = np.random.default_rng(0)
mock = pd.DataFrame({"a": rng.normal(size=60), "b": rng.normal(size=60), "y": [0, 1] * 30})
sites = types.ModuleType("researcher.sites")  # no syft, no network: one site with this mock
sites.connect = lambda login, fresh=False: object()
sites.find_asset = lambda client, dataset: types.SimpleNamespace(mock=mock)
sites.asset_meta = lambda asset: {"rows": 60, "target": "y"}
sites.quiet = contextlib.nullcontext
sys.modules["researcher.sites"] = sites
import researcher
researcher.sites = sites
from researcher import api
from researcher.federation import Federation, SiteLogin
from researcher.job import make_job

layers = [{"type": "Linear", "in_features": 2, "out_features": 2}]
spec = make_job(layers, "d", "y", {"noise_multiplier": 1.0, "batch_size": 16}, n_features=2)
fed = Federation([SiteLogin("site-a", "http://127.0.0.1:1", "r@x")], Path("."))
result = api.dry_run(fed, spec)
assert result["status"] == "ok" and result["mode"] == "dry-run", result
print(sorted(m for m in sys.modules if m.split(".")[0] == "datasites"))
"""


def test_the_researchers_dry_run_runs_no_site_code() -> None:
    """The dry run is the sites' round engine (``policies.engine``), imported as such: the
    researcher's process loads no ``datasites`` module, and needs no variable to say where it is
    (it once ran the submitted function, whose body imports the site runtime)."""
    env = {k: v for k, v in os.environ.items() if k != "FEDSITE_DIR"} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _DRY_RUN], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_every_datasites_room_says_what_it_holds() -> None:
    rooms = [p for p in (ROOT / "datasites").iterdir() if (p / "__init__.py").exists()]
    assert {p.name for p in rooms} == {"console", "data", "ledger", "review", "serving", "training"}
    for room in rooms:
        doc = ast.get_docstring(ast.parse((room / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 1, room.name


def _sources(*packages: str):  # noqa: ANN202
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())


def test_the_wire_tags_of_a_job_call_are_spelt_in_policies_wire_only() -> None:
    """One string argument carries several protocols (issue 27): its tags live in
    ``policies/wire.py``, and every other module speaks of a call through its types."""
    from policies.wire import ReplayLast, SecAggHello

    tags = {m.encode().partition(":")[0] + ":" for m in (ReplayLast(), SecAggHello())}
    found = [
        (name, node.value)
        for name, tree in _sources("datasites", "researcher", "policies", "scripts")
        if name != "policies/wire.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith(tuple(tags))
    ]
    assert found == []


def test_a_call_is_decoded_once_where_it_enters_the_site() -> None:
    """``decode_call`` runs where a call enters the site (``site_job.run_at_site``) and in no
    other module of the packages, so no second reading of the argument can disagree. (The
    researcher's dry run hands ``policies.engine`` plain weights: no message to decode.)"""
    callers = {
        name
        for name, tree in _sources("datasites", "researcher", "policies")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "decode_call"
    }
    assert callers == {"datasites/training/site_job.py"}
