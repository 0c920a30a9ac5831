"""Static checks on submitted code: is it the project's template, and is the model code tame?

The datasite never trusts a submission to be what the researcher package would have produced:
anyone with a plain syft client can send any function. These checks parse the source (never run
it) and say, in one line each, what is wrong.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

RUNTIME_MODULE = "datasites.runtime"
RUNTIME_FUNCTION = "run_job"
TEMPLATE_ARGS = ("data", "weights")

ALLOWED_IMPORTS = frozenset(
    {"torch", "torch.nn", "torch.nn.functional", "math", "numpy", "typing", "collections"}
)
BANNED_NAMES = frozenset(
    {
        "open",
        "eval",
        "exec",
        "compile",
        "__import__",
        "getattr",
        "setattr",
        "delattr",
        "globals",
        "locals",
        "vars",
        "input",
        "breakpoint",
        "memoryview",
        "exit",
        "quit",
        "help",
        "dir",
        "type",
        "object",
        "classmethod",
        "staticmethod",
        "property",
    }
)
ALLOWED_DUNDERS = frozenset({"__init__"})
# Attributes of torch that reach files, processes, the network or foreign code.
BANNED_ATTRIBUTES = frozenset(
    {
        "load",
        "save",
        "hub",
        "ops",
        "classes",
        "jit",
        "compile",
        "utils",
        "multiprocessing",
        "distributed",
        "package",
        "library",
        "cuda",
        "backends",
        "fx",
        "onnx",
        "testing",
        "from_file",
        "tofile",
        "fromfile",
        "ctypeslib",
        "lib",
        "system",
        "popen",
    }
)


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
    ``from datasites.runtime import run_job`` and ``return run_job(data=data, weights=weights,
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


def check_model_source(source: str) -> list[Finding]:
    """Findings for model code that imports beyond the allowed list or reaches for escapes."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return [Finding(exc.lineno or 0, f"model code has a syntax error: {exc.msg}")]
    findings: list[Finding] = []
    for node in ast.walk(tree):
        findings += _check_node(node)
    return findings


def _check_node(node: ast.AST) -> list[Finding]:
    line = getattr(node, "lineno", 0)
    if isinstance(node, ast.Import):
        return [
            Finding(line, f"import of {a.name!r} is not allowed")
            for a in node.names
            if a.name not in ALLOWED_IMPORTS
        ]
    if isinstance(node, ast.ImportFrom):
        module = node.module or ""
        if node.level or module not in ALLOWED_IMPORTS:
            return [Finding(line, f"import from {module!r} is not allowed")]
        return []
    if isinstance(node, ast.Name) and node.id in BANNED_NAMES:
        return [Finding(line, f"use of {node.id!r} is not allowed")]
    if isinstance(node, ast.Name) and node.id.startswith("__"):
        return [Finding(line, f"dunder name {node.id!r} is not allowed")]
    if isinstance(node, ast.Attribute):
        if node.attr.startswith("__") and node.attr not in ALLOWED_DUNDERS:
            return [Finding(line, f"dunder attribute {node.attr!r} is not allowed")]
        if node.attr in BANNED_ATTRIBUTES:
            return [
                Finding(line, f"attribute {node.attr!r} (files, processes, code) is not allowed")
            ]
    if isinstance(node, ast.Global | ast.Nonlocal):
        return [Finding(line, "global and nonlocal are not allowed")]
    if isinstance(node, ast.AsyncFunctionDef | ast.Await | ast.Yield | ast.YieldFrom):
        return [Finding(line, "async code and generators are not allowed")]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and "__" in node.value:
        return [Finding(line, "strings holding dunder names are not allowed")]
    return []
