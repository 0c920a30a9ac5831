"""What syft will execute for a code request, checked field by field against its raw code.

The review reads ``raw_code``; syft executes ``parsed_code`` and then evaluates
``unique_func_name(**kwargs)``, with the inputs named in ``input_kwargs`` and policies that may
themselves be code. A plain syft client can make these disagree (a template in ``raw_code``, a
``func_name`` pointing at something else), so the review recomputes each one from ``raw_code``
with syft's own functions and refuses a request where any differs.
"""

from __future__ import annotations

import ast
from typing import Any

from syft.service.code.user_code import get_code_hash, parse_user_code
from syft.service.policy.policy import MixedInputPolicy, OutputPolicyExecuteCount

from datasites.review.codecheck import parsed_problems

TEMPLATE_INPUTS = ["data", "weights"]


def executed_problems(code: Any) -> list[str]:
    """Every way in which what syft runs for ``code`` is not its raw code's one function."""
    raw = code.raw_code
    try:
        tree = ast.parse(raw)
        name = tree.body[0].name if isinstance(tree.body[0], ast.FunctionDef) else None
    except (SyntaxError, IndexError):
        return ["raw code does not parse as one function"]
    problems = []
    if name is None or code.service_func_name != name:
        problems.append(f"syft calls {code.service_func_name!r}, the raw code defines {name!r}")
    if list(code.input_kwargs) != TEMPLATE_INPUTS:
        problems.append(f"syft passes inputs {list(code.input_kwargs)}, not {TEMPLATE_INPUTS}")
    if code.code_hash != get_code_hash(raw, code.user_verify_key):
        problems.append("the stored code hash is not the hash of the raw code")
    unique = f"user_func_{code.service_func_name}_{code.user_verify_key}_{code.code_hash}"
    if code.unique_func_name != unique:
        problems.append(f"syft evaluates {code.unique_func_name!r}, expected {unique!r}")
    expected = parse_user_code(raw, code.unique_func_name, code.service_func_name, TEMPLATE_INPUTS)
    if code.parsed_code != expected:
        problems.append("the parsed code syft executes differs from the raw code")
    problems += [
        f"syft's parsed code, {finding}"
        for finding in parsed_problems(code.parsed_code, code.service_func_name)
    ]
    if code.nested_codes or code.uses_datasite:
        problems.append("the code launches nested jobs")
    if code.input_policy_type is not MixedInputPolicy:
        problems.append(f"input policy {_name(code.input_policy_type)} is not MixedInputPolicy")
    if code.output_policy_type is not OutputPolicyExecuteCount:
        problems.append(
            f"output policy {_name(code.output_policy_type)} is not OutputPolicyExecuteCount"
        )
    return problems


def _name(policy: Any) -> str:
    return getattr(policy, "__name__", type(policy).__name__)
