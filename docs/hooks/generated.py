"""mkdocs hook: the pages that must not drift from the code are generated at build time.

- ``<!-- generated: plan-reference -->`` becomes the table of every ``TrainingPlan`` field, read
  from the dataclasses themselves (``policies/plan.py`` and its sections in
  ``policies/plan_sections.py``): each field by the flat name a job file writes, its type and
  default, the comment above or beside it, and the bounds and allowed values its checks and
  enums name; one table per section, titled by the section's docstring. A field added to the
  plan appears here without anyone editing the docs.
- ``<!-- generated: policy-reference -->`` becomes the same table for ``DatasetPolicy``
  (``datasites/review/access.py``), the fields an admin sets with ``datasite policy set``.
- ``<!-- generated: cli datasite -->`` / ``<!-- generated: cli researcher -->`` become every
  command of that CLI with its arguments and options, from the typer app's own click tree.

Nothing is written to disk and nothing is fetched: the build stays offline.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!-- generated: ([a-z-]+)(?: ([a-z]+))? -->")


def on_page_markdown(markdown: str, **_: Any) -> str:
    """mkdocs calls this for every page; only pages holding a marker change."""
    return MARKER.sub(lambda m: _render(m.group(1), m.group(2)), markdown)


def _render(kind: str, arg: str | None) -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if kind == "plan-reference":
        import policies.plan as plan
        from policies.plan import TrainingPlan

        steps = getattr(plan, "MAX_TOTAL_STEPS", None)
        cap = f"A plan may take at most {steps:,} DP-SGD steps in all.\n\n" if steps else ""
        return cap + plan_table(TrainingPlan)
    if kind == "policy-reference":
        from datasites.review.access import DatasetPolicy

        return plan_table(DatasetPolicy)
    if kind == "cli" and arg in ("datasite", "researcher"):
        return cli_reference(arg)
    raise ValueError(f"unknown generated block: {kind} {arg}")


# --- the plan reference ---------------------------------------------------------------------


def plan_table(plan_cls: type) -> str:
    """The plan's fields in the groups its source gives them (a comment opens a group), one
    table per group. A nested dataclass section (``TrainingPlan.dp``...) is its own group,
    titled by its docstring, and its fields are listed by the flat names a job file writes
    (a field's ``metadata["wire"]``, else its name)."""
    out = []
    for title, rows in _groups(plan_cls, ""):
        if title:
            out.append(_code(title))
        out += ["", "| field | type | default | allowed | note |", "|---|---|---|---|---|"]
        out += [f"| `{n}` | `{t}` | {d} | {a} | {note} |" for n, t, d, a, note in rows]
        out.append("")
    return "\n".join(out)


def _groups(cls: type, section: str) -> list[tuple[str, list[tuple[str, ...]]]]:
    checks = _field_checks(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    groups: list[tuple[str, list[tuple[str, ...]]]] = []
    for i, (title, names) in enumerate(_source_groups(cls)):
        if i == 0 and section:
            title = f"**`plan.{section}`**: {_summary(cls)}"
        rows = []
        for name, trailing in names:
            field, hint = fields[name], hints[name]
            if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                if rows:
                    groups.append((title, rows))
                    title, rows = "", []
                groups += _groups(hint, name)
                continue
            wire = field.metadata.get("wire", name)
            allowed = _allowed(hint, checks, wire)
            row = (wire, _type(field, hint), _default(field), allowed, trailing)
            rows.append(tuple(_cell(c) if i > 2 else c for i, c in enumerate(row)))
        if rows:
            groups.append((title, rows))
    return groups


def _summary(cls: type) -> str:
    """A section's docstring, joined into one paragraph."""
    return " ".join((inspect.getdoc(cls) or "").split())


def _source_groups(cls: type) -> list[tuple[str, list[tuple[str, str]]]]:
    """The class body's fields in order, grouped: a comment block opens a group that runs to the
    next comment block (a blank line alone does not end it). Each field keeps its own trailing
    comment."""
    lines = inspect.getsource(cls).splitlines()
    body = ast.parse(inspect.getsource(cls)).body[0]
    assert isinstance(body, ast.ClassDef)
    groups: list[tuple[str, list[tuple[str, str]]]] = [("", [])]
    previous = body.lineno  # the line after the docstring or the last field, 1-based
    for node in body.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            previous = node.end_lineno or node.lineno
            continue
        above = [t.strip() for t in lines[previous : node.lineno - 1]]
        block = [t.lstrip("# ") for t in above if t.startswith("#")]
        if block:
            groups.append((" ".join(block), []))
        code = lines[(node.end_lineno or node.lineno) - 1]
        trailing = code.split("  # ", 1)[1].strip() if "  # " in code else ""
        groups[-1][1].append((node.target.id, trailing))
        previous = node.end_lineno or node.lineno
    return [g for g in groups if g[1]]


def _code(text: str) -> str:
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _cell(text: str) -> str:
    return _code(text).replace("|", "\\|") if "`" not in text[:1] else text


def _allowed(hint: Any, checks: dict[str, str], wire: str) -> str:
    """An enum's values, else what the checks say of the field."""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return " or ".join(f"`{m.value}`" for m in hint)
    return checks.get(wire, "true or false" if hint is bool else "")


def _field_checks(cls: type) -> dict[str, str]:
    """Bounds and allowed values, by flat field name, read from the checks in the class's own
    methods: the range helpers' bounds (their first argument names the field), the tuples of
    allowed values, and the ``"FIELD must be ..."`` messages."""
    module = sys.modules[cls.__module__]
    tree = ast.parse(inspect.getsource(cls))
    names = {f.metadata.get("wire", f.name) for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}

    def const(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        return getattr(module, node.id, None) if isinstance(node, ast.Name) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            kind = RANGE_HELPERS.get(node.func.id)
            args = node.args
            if kind and len(args) == 3 and isinstance(const(args[0]), str):
                out.setdefault(const(args[0]), f"{kind} in (0, {const(args[2]):g}]")
            elif node.func.id == "PlanError" and args:
                _must(_literal(args[0], module), names, out)
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.NotIn):
            left, right = node.left, node.comparators[0]
            if isinstance(left, ast.Attribute) and isinstance(const(right), tuple):
                out.setdefault(left.attr, " or ".join(f"`{v}`" for v in const(right)))
    return out


RANGE_HELPERS = {"positive_int": "integer", "positive_float": "number"}


def _literal(node: ast.AST, module: Any = None) -> str:
    """A message's text; a formatted module constant (``{MAX_PEERS}``) as its value, any other
    formatted value as ``{}``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_part(v, module) for v in node.values)
    return ""


def _part(node: ast.AST, module: Any) -> str:
    if isinstance(node, ast.Constant):
        return str(node.value)
    inner = getattr(node, "value", None)
    value = getattr(module, inner.id, None) if isinstance(inner, ast.Name) else None
    if not isinstance(node, ast.FormattedValue) or not isinstance(value, int | float):
        return "{}"
    return format(value, _literal(node.format_spec) if node.format_spec else "")


def _must(message: str, names: set[str], out: dict[str, str]) -> None:
    match = re.match(r"(\w+) must be (.+?)(?:, got.*|; got.*)?$", message)
    if match and match.group(1) in names and "{}" not in match.group(2):
        out.setdefault(match.group(1), match.group(2))


def _type(field: dataclasses.Field, hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "str"
    text = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    return str(text).replace("|", "or")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    return "none" if value is None else f"`{value!r}`"


# --- the CLI reference ----------------------------------------------------------------------


def cli_reference(tool: str) -> str:
    """Every command of ``datasite`` or ``researcher``: usage, help line, parameters."""
    import click
    import typer

    module = {"datasite": "datasites.cli", "researcher": "researcher.cli"}[tool]
    app = __import__(module, fromlist=["app"]).app
    root = typer.main.get_command(app)
    parts: list[str] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            if path and _own_params(cmd):
                parts.append(_command_section(cmd, path))
            for name in cmd.list_commands(click.Context(cmd)):
                walk(cmd.get_command(click.Context(cmd), name), [*path, name])
            return
        parts.append(_command_section(cmd, path))

    walk(root, [tool])
    return "\n\n".join(parts)


def _own_params(cmd: Any) -> list:
    return [p for p in cmd.params if p.name != "help"]


def _command_section(cmd: Any, path: list[str]) -> str:
    summary = (cmd.help or "").strip().split("\n\n")[0].replace("\n", " ")
    lines = [f"### `{' '.join(path)}`", "", summary, ""]
    params = _own_params(cmd)
    if params:
        lines += ["| parameter | what | default |", "|---|---|---|"]
        for p in params:
            lines.append(f"| {_param_name(p)} | {_param_help(p)} | {_param_default(p)} |")
    return "\n".join(lines)


def _param_name(p: Any) -> str:
    if p.param_type_name == "argument":
        return f"`{p.name.upper()}`"
    names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
    return names + (" *(required)*" if p.required else "")


def _param_help(p: Any) -> str:
    text = (getattr(p, "help", None) or "").replace("\n", " ").replace("|", "\\|")
    return text


def _param_default(p: Any) -> str:
    if p.required or p.default is None or getattr(p, "is_flag", False) and p.default is False:
        return ""
    return f"`{p.default}`"
