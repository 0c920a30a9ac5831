"""Static check on submitted code: is it exactly the project's template?

The datasite never trusts a submission to be what the researcher package would have produced:
anyone with a plain syft client can send any function. This parses the source (never runs it)
and says, in one line each, what is wrong. There is no model code to check: a job's model is a
declarative spec inside the job literal (``policies.modelspec``).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

RUNTIME_MODULE = "datasites.training.runtime"
RUNTIME_FUNCTION = "run_job"
TEMPLATE_ARGS = ("data", "weights")


@dataclass(frozen=True)
class Finding:
    """One problem found in submitted code, with the line it is on."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def parse_template(raw_code: str) -> tuple[dict[str, Any] | None, list[Finding]]:
    """Return the job literal when ``raw_code`` is exactly the template, else the findings.

    The template is one function of ``(data, weights)`` whose body is an optional docstring,
    ``from datasites.training.runtime import run_job`` and ``return run_job(data=data, weights=weights,
    job=<literal>)``. Anything else, however harmless it looks, fails.
    """
    try:
        tree = ast.parse(raw_code)
    except SyntaxError as exc:
        return None, [Finding(exc.lineno or 0, f"syntax error: {exc.msg}")]
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None, [Finding(1, "the submission must be exactly one function and nothing else")]
    fn = tree.body[0]
    problems = _check_signature(fn)
    body = list(fn.body)
    if body and _is_docstring(body[0]):
        body = body[1:]
    if len(body) != 2:
        problems.append(
            Finding(fn.lineno, f"the function body has {len(body)} statements; the template has 2")
        )
        return None, problems
    problems += _check_import(body[0])
    job, call_problems = _check_return(body[1])
    problems += call_problems
    return (job if not problems else None), problems


def _check_signature(fn: ast.FunctionDef) -> list[Finding]:
    args = fn.args
    names = tuple(a.arg for a in args.args)
    if (
        names != TEMPLATE_ARGS
        or args.vararg
        or args.kwarg
        or args.kwonlyargs
        or args.posonlyargs
        or args.defaults
    ):
        return [Finding(fn.lineno, f"the function must take exactly (data, weights), not {names}")]
    return []


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _check_import(stmt: ast.stmt) -> list[Finding]:
    ok = (
        isinstance(stmt, ast.ImportFrom)
        and stmt.module == RUNTIME_MODULE
        and stmt.level == 0
        and [(a.name, a.asname) for a in stmt.names] == [(RUNTIME_FUNCTION, None)]
    )
    if ok:
        return []
    return [Finding(stmt.lineno, f"expected 'from {RUNTIME_MODULE} import {RUNTIME_FUNCTION}'")]


def _check_return(stmt: ast.stmt) -> tuple[dict[str, Any] | None, list[Finding]]:
    expected = f"expected 'return {RUNTIME_FUNCTION}(data=data, weights=weights, job={{...}})'"
    if not (isinstance(stmt, ast.Return) and isinstance(stmt.value, ast.Call)):
        return None, [Finding(stmt.lineno, expected)]
    call = stmt.value
    if not (isinstance(call.func, ast.Name) and call.func.id == RUNTIME_FUNCTION) or call.args:
        return None, [Finding(stmt.lineno, expected)]
    kwargs = {k.arg: k.value for k in call.keywords}
    if set(kwargs) != {"data", "weights", "job"}:
        return None, [Finding(stmt.lineno, expected)]
    for name in ("data", "weights"):
        node = kwargs[name]
        if not (isinstance(node, ast.Name) and node.id == name):
            return None, [Finding(stmt.lineno, f"{name} must be passed through unchanged")]
    try:
        job = ast.literal_eval(kwargs["job"])
    except (ValueError, SyntaxError):
        return None, [Finding(stmt.lineno, "job must be a literal dict of plain values")]
    if not isinstance(job, dict):
        return None, [Finding(stmt.lineno, "job must be a dict")]
    return job, []
