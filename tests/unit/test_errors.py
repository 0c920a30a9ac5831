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
from datasites.serving import syft_client
from policies.errors import FedsiteError
from researcher import syft_adapter

WINGS = [syft_adapter, syft_client]  # each wing's adapter of syft's client


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


@pytest.mark.parametrize("wing", WINGS)
def test_syft_failures_become_the_wings_errors_and_others_pass_through(wing) -> None:
    login = wing.syft_errors("site-a: login refused", Failed, Down)
    with pytest.raises(Failed, match=r"^site-a: login refused: Invalid credentials$"), login:
        raise SyftException(public_message="Invalid credentials")
    with pytest.raises(Down, match="no datasite answers"), wing.syft_errors("a", Failed, Down):
        raise requests.ConnectionError("refused")
    tls = wing.syft_errors("a", Failed, Down)
    with pytest.raises(Failed, match="TLS certificate is not the one trusted"), tls:
        raise requests.ConnectionError("x") from ValueError("Fingerprints did not match")
    with pytest.raises(ValueError, match="a bug"), wing.syft_errors("site-a", Failed, Down):
        raise ValueError("a bug")
    ours = Down("already ours")
    with pytest.raises(Down) as caught, wing.syft_errors("site-a", Failed, Down):
        raise ours
    assert caught.value is ours


@pytest.mark.parametrize("wing", WINGS)
def test_a_returned_syft_error_is_raised_and_anything_else_returned(wing) -> None:
    with pytest.raises(Failed, match="^upload failed: no space$"):
        wing.check_reply(sy.SyftError(message="no space"), "upload failed", Failed)
    assert wing.check_reply({"status": "ok"}, "x", Failed) == {"status": "ok"}
