"""The review's "changes" check: a request may carry one change, its own code's status.

Red team, round 2: a request filed with syft's ``request.submit`` carried, beside the status
change, an ``ObjectMutation`` of the approved code's ``parsed_code``; syft applies every change
of a request with the approver's rights, and the report read only ``request.code``.
"""

from __future__ import annotations

from types import SimpleNamespace

from syft.service.code.user_code import UserCodeStatus
from syft.service.request.request import ObjectMutation, UserCodeStatusChange
from syft.store.linked_obj import LinkedObject
from syft.types.uid import UID

from datasites.review.queue import UNOVERRIDABLE, _changes_problem


def _link(uid: UID) -> LinkedObject:
    from syft.service.code.user_code import UserCode
    from syft.service.code.user_code_service import UserCodeService

    return LinkedObject(
        server_uid=UID(), service_type=UserCodeService, object_type=UserCode, object_uid=uid
    )


def _status(code_id: UID) -> UserCodeStatusChange:
    return UserCodeStatusChange(
        value=UserCodeStatus.APPROVED, linked_obj=_link(UID()), linked_user_code=_link(code_id)
    )


def test_only_the_codes_own_status_change_passes() -> None:
    code = SimpleNamespace(id=UID())
    assert _changes_problem(SimpleNamespace(changes=[_status(code.id)]), code) is None
    rider = ObjectMutation(
        linked_obj=_link(code.id), attr_name="parsed_code", value="evil", match_type=False
    )
    both = _changes_problem(SimpleNamespace(changes=[_status(code.id), rider]), code)
    assert both is not None and "ObjectMutation" in both
    alone = _changes_problem(SimpleNamespace(changes=[rider]), code)
    assert alone is not None and "only one code status change" in alone
    other = _changes_problem(SimpleNamespace(changes=[_status(UID())]), code)
    assert other is not None and "other code" in other
    assert _changes_problem(SimpleNamespace(changes=[]), code) is not None
    assert "changes" in UNOVERRIDABLE  # --override cannot approve a rider
