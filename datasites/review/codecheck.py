"""Static check on submitted code: is it exactly the project's template?

The datasite never trusts a submission to be what the researcher package would have produced:
anyone with a plain syft client can send any function. This parses the source (never runs it)
and says, in one line each, what is wrong. There is no model code to check: a job's model is a
declarative spec inside the job literal (``policies.modelspec``).
"""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass
from typing import Any

from policies import job_template
from policies.job_template import ARGS as TEMPLATE_ARGS
from policies.job_template import RUNTIME_FUNCTION, RUNTIME_MODULE


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
    problems = _check_signature(fn) + _named_differences(fn)
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
    if not problems:
        problems = exact_problems(fn)
    return (job if not problems else None), problems


_PLACEHOLDER = "_"


def _shape(docstring: bool) -> str:
    """The template's shape (``policies.job_template``, the text the researcher renders), its
    name, docstring text and job literal left out as a submission's are: what a submission's
    one function must equal node for node (no annotation, default, decorator, type comment or
    statement that the template does not have)."""
    fn = ast.parse(job_template.render("_job", _PLACEHOLDER, {})).body[0]
    assert isinstance(fn, ast.FunctionDef)
    if not docstring:
        fn.body = fn.body[1:]
    return ast.dump(_bare(fn))


def exact_problems(fn: ast.FunctionDef) -> list[Finding]:
    """Findings unless ``fn`` is the template node for node, up to its name, its docstring's
    text and its job literal's content (which ``_check_return`` reads with literal_eval).

    Why exact: syft copies the function's arguments into the wrapper it executes (a default is
    evaluated when that wrapper is defined), and strips decorators only because it happens to;
    a check that lists what is forbidden misses what nobody thought of.
    """
    body = fn.body
    if ast.dump(_bare(fn)) != _shape(bool(body) and _is_docstring(body[0])):
        return [Finding(fn.lineno, "the function differs from the template beyond its job literal")]
    return []


def _bare(fn: ast.FunctionDef) -> ast.FunctionDef:
    """A copy of ``fn`` with its name, its docstring's text and its job literal's content
    replaced by placeholders: what is left must be the template's."""
    bare = copy.deepcopy(fn)
    bare.name = "_job"
    body = bare.body
    if body and _is_docstring(body[0]):
        body[0] = ast.Expr(value=ast.Constant(value=_PLACEHOLDER))
    ret = body[-1] if body else None
    if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Call):
        for kw in ret.value.keywords:
            if kw.arg == "job":
                kw.value = ast.Dict(keys=[], values=[])
    return bare


def _named_differences(fn: ast.FunctionDef) -> list[Finding]:
    """The departures from the template that have a name, one line each."""
    found = []
    if fn.decorator_list:
        found.append(Finding(fn.lineno, "the function has a decorator; the template has none"))
    if fn.returns is not None:
        found.append(Finding(fn.lineno, "the function has a return annotation"))
    if fn.type_comment:
        found.append(Finding(fn.lineno, "the function has a type comment"))
    args = fn.args
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    every += [a for a in (args.vararg, args.kwarg) if a is not None]
    for arg in every:
        if arg.annotation is not None or arg.type_comment:
            found.append(Finding(arg.lineno, f"argument {arg.arg!r} has an annotation"))
    if args.defaults or any(d is not None for d in args.kw_defaults):
        found.append(Finding(fn.lineno, "an argument has a default value"))
    return found


def parsed_problems(parsed_code: str, func_name: str) -> list[Finding]:
    """Syft's parsed code (what it executes), checked on the same terms as the raw code.

    syft wraps the submitted function in ``def <unique name>(<its arguments>)``, whose body is
    that function, ``result = <name>(data=data, weights=weights)`` and ``return result``. The
    wrapper takes the submitted function's own arguments, so an annotation or a default there
    runs in syft even though the inner function is never called with it.
    """
    try:
        tree = ast.parse(parsed_code)
    except SyntaxError as exc:
        return [Finding(exc.lineno or 0, f"syft's parsed code does not parse: {exc.msg}")]
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return [Finding(1, "syft's parsed code is not one wrapper function")]
    wrapper = tree.body[0]
    found = _named_differences(wrapper) + _check_signature(wrapper)
    inner = wrapper.body[0] if wrapper.body else None
    if not (isinstance(inner, ast.FunctionDef) and inner.name == func_name):
        return [*found, Finding(wrapper.lineno, f"syft's wrapper does not define {func_name!r}")]
    found += parse_template(ast.unparse(inner))[1]
    found = list({f.message: f for f in found}.values())  # the wrapper repeats the arguments
    call = f"result = {func_name}(data=data, weights=weights)\nreturn result"
    if ast.dump(ast.Module(body=wrapper.body[1:], type_ignores=[])) != ast.dump(ast.parse(call)):
        found.append(Finding(wrapper.lineno, "syft's wrapper does more than call the function"))
    return found


def _check_signature(fn: ast.FunctionDef) -> list[Finding]:
    args = fn.args
    names = tuple(a.arg for a in args.args)
    if names != TEMPLATE_ARGS or args.vararg or args.kwarg or args.kwonlyargs or args.posonlyargs:
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
