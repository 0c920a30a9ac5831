"""The house rules of the layout (DESIGN's wing rule), read from the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
    assert not kept & {"ledger", "audit", "store", "access", "report", "codecheck"}


def test_no_import_cycle_in_datasites() -> None:
    """runtime -> site_job -> runtime was one (lazy on one side); helpers now live apart."""
    graph = {
        m: {n for n in names if n.startswith("datasites.")}
        for m, names in _imports("datasites").items()
    }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = [m for m in graph if reaches(m, m, {m})]
    assert cycles == []


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
    """``decode_call`` runs in the two halves of ``run_job`` (the site, the dry run) and in no
    other module of the packages, so no second reading of the argument can disagree."""
    callers = {
        name
        for name, tree in _sources("datasites", "researcher", "policies")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "decode_call"
    }
    assert callers == {"datasites/training/site_job.py", "datasites/training/runtime.py"}
