"""One root for every deliberate error, and one translation of syft's failures per wing."""

from __future__ import annotations

import inspect

import pytest
import requests
import syft as sy
from syft.types.errors import SyftException

import datasites.errors
import policies.errors
import researcher.errors
from policies.errors import FedsiteError, check_reply, map_syft_errors


class Failed(FedsiteError):
    pass


class Down(FedsiteError):
    pass


def test_every_error_class_of_every_package_has_the_one_root() -> None:
    classes = [
        c
        for module in (datasites.errors, policies.errors, researcher.errors)
        for _, c in inspect.getmembers(module, inspect.isclass)
        if issubclass(c, BaseException)
    ]
    assert len(classes) >= 17
    assert all(issubclass(c, FedsiteError) for c in classes), classes
    from datasites.errors import Refused
    from datasites.training.sandbox import SandboxLimit
    from datasites.training.site_job import RoundFailed
    from researcher.sites import Unreachable

    assert all(
        issubclass(c, FedsiteError) for c in (Refused, SandboxLimit, RoundFailed, Unreachable)
    )


def test_syft_failures_become_the_wings_errors_and_others_pass_through() -> None:
    login = map_syft_errors("site-a: login refused", Failed, Down)
    with pytest.raises(Failed, match=r"^site-a: login refused: Invalid credentials$"), login:
        raise SyftException(public_message="Invalid credentials")
    with pytest.raises(Down, match="no datasite answers"), map_syft_errors("a", Failed, Down):
        raise requests.ConnectionError("refused")
    with pytest.raises(ValueError, match="a bug"), map_syft_errors("site-a", Failed, Down):
        raise ValueError("a bug")
    ours = Down("already ours")
    with pytest.raises(Down) as caught, map_syft_errors("site-a", Failed, Down):
        raise ours
    assert caught.value is ours


def test_a_returned_syft_error_is_raised_and_anything_else_returned() -> None:
    with pytest.raises(Failed, match="^upload failed: no space$"):
        check_reply(sy.SyftError(message="no space"), "upload failed", Failed)
    assert check_reply({"status": "ok"}, "x", Failed) == {"status": "ok"}
