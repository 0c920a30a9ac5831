"""The server-side syft fixes keep syft's behaviour and stop walking bytes."""

from __future__ import annotations

import pandas as pd
import pytest
import syft.service.service as service
import syft.types.syft_object as syft_object
from syft.store.blob_storage import SyftObjectRetrieval
from syft.types.result import Ok
from syft.types.syft_object import SyftObject
from syft.types.uid import UID

from datasites import syft_patches

ORIGINAL = syft_object.attach_attribute_to_syft_object


class NoIteration(bytes):
    def __iter__(self):  # a walk over the bytes would call this
        raise AssertionError("walked over bytes")


def _tree() -> tuple[object, list[SyftObject]]:
    inner = [SyftObject(id=UID()) for _ in range(3)]
    blob = SyftObjectRetrieval(syft_object=b"parquet" * 10, type_=None, file_name="t")
    tree = [inner[0], {"k": inner[1]}, Ok(inner[2]), blob, "text"]
    return tree, [*inner, blob]


def test_stamps_the_same_objects_as_syft() -> None:
    attrs = {"syft_server_location": UID()}
    ours_tree, ours = _tree()
    syft_patches.attach_attribute_to_syft_object(ours_tree, attrs)
    theirs_tree, theirs = _tree()
    ORIGINAL(theirs_tree, attrs)
    stamped = [o.syft_server_location for o in ours]
    assert stamped == [o.syft_server_location for o in theirs]
    # syft stamps top-level items and fields of syft objects, not what sits in a nested dict/Ok
    here = attrs["syft_server_location"]
    assert stamped == [here, None, None, here]


def test_does_not_walk_bytes_or_strings() -> None:
    blob = SyftObjectRetrieval(syft_object=NoIteration(b"x" * 1000), type_=None, file_name="t")
    syft_patches.attach_attribute_to_syft_object(blob, {"syft_server_location": UID()})
    with pytest.raises(AssertionError, match="walked over bytes"):
        ORIGINAL(blob, {"syft_server_location": UID()})


def test_install_patches_syft_and_frame_repr() -> None:
    saved = (syft_object.attach_attribute_to_syft_object, pd.DataFrame.__repr__)
    try:
        syft_patches.install()
        assert (
            service.attach_attribute_to_syft_object is syft_patches.attach_attribute_to_syft_object
        )
        assert (
            syft_object.attach_attribute_to_syft_object is service.attach_attribute_to_syft_object
        )
        frame = pd.DataFrame({"secret": [123456789.0, 2.0]})
        assert repr(frame) == str(frame) == "<DataFrame: 2 rows x 1 columns>"
    finally:
        syft_object.attach_attribute_to_syft_object = saved[0]
        service.attach_attribute_to_syft_object = saved[0]
        pd.DataFrame.__repr__ = saved[1]


@pytest.fixture(scope="module")
def in_process_server():
    """A real syft server inside this process (no HTTP): its user stash is what we patch."""
    import syft as sy

    server = sy.orchestra.launch(name="role-memo-test", reset=True)
    yield server
    server.python_server.cleanup()


def test_memoised_role_follows_role_changes_and_deletion(in_process_server) -> None:
    from syft.server.credentials import SyftSigningKey
    from syft.service.user.user_roles import ServiceRole
    from syft.store.db.stash import ObjectStash, with_session

    server = in_process_server.python_server
    admin = in_process_server.login(email="info@openmined.org", password="changethis")
    admin.register(
        name="Ada", email="ada@uni.edu", password="pw-123456", password_verify="pw-123456"
    )
    stash = server.services.user.stash
    ada = stash.get_by_email(credentials=server.verify_key, email="ada@uni.edu").unwrap()
    stranger = SyftSigningKey.generate().verify_key
    original = ObjectStash.get_role
    patched = with_session(syft_patches.get_role)

    def both(key: object) -> tuple[object, object]:
        return original(stash, key), patched(stash, key)

    assert both(server.verify_key) == (ServiceRole.ADMIN, ServiceRole.ADMIN)
    assert both(ada.verify_key) == (ServiceRole.DATA_SCIENTIST,) * 2
    hits = syft_patches._role_of_row.cache_info().hits
    assert patched(stash, ada.verify_key) == ServiceRole.DATA_SCIENTIST
    assert syft_patches._role_of_row.cache_info().hits == hits + 1  # no deserialisation
    assert both(stranger) == (ServiceRole.GUEST, ServiceRole.GUEST)
    admin.users.update(uid=ada.id, role=ServiceRole.DATA_OWNER)
    assert both(ada.verify_key) == (ServiceRole.DATA_OWNER,) * 2
    admin.users.delete(ada.id)
    assert both(ada.verify_key) == (ServiceRole.GUEST, ServiceRole.GUEST)
