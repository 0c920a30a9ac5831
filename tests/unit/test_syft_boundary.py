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

from datasites.serving import syft_patches

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


def test_install_patches_syft_and_restores_it() -> None:
    """It once left ``ObjectStash.get_role`` patched, so a later "same as syft" check compared
    the patch with itself."""
    from syft.store.db.stash import ObjectStash

    saved = (syft_object.attach_attribute_to_syft_object, ObjectStash.get_role)
    restore = syft_patches.install()
    try:
        assert (
            service.attach_attribute_to_syft_object is syft_patches.attach_attribute_to_syft_object
        )
        assert (
            syft_object.attach_attribute_to_syft_object is service.attach_attribute_to_syft_object
        )
        assert ObjectStash.get_role is not saved[1]
    finally:
        restore()
    assert syft_object.attach_attribute_to_syft_object is saved[0]
    assert service.attach_attribute_to_syft_object is saved[0]
    assert ObjectStash.get_role is saved[1]


def test_dataframe_repr_is_a_shape_summary_until_restored() -> None:
    frame = pd.DataFrame({"secret": [123456789.0, 2.0]})
    restore = syft_patches.summarise_dataframe_repr()
    try:
        assert repr(frame) == str(frame) == "<DataFrame: 2 rows x 1 columns>"
    finally:
        restore()
    assert "123456789" in repr(frame)


def test_any_other_syft_version_is_refused(monkeypatch) -> None:
    import syft

    from datasites.errors import ConfigError

    syft_patches.check_syft_version()
    monkeypatch.setattr(syft, "__version__", "0.10.0")
    with pytest.raises(ConfigError, match="needs syft==0.9.5"):
        syft_patches.install()


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


SEEN: list[tuple[str, str, bool]] = []  # what caller_code said, from inside syft's execution


def test_caller_code_finds_the_approved_code_on_syfts_real_execution_path(
    in_process_server,
) -> None:
    """``runtime.caller_code`` reads syft 0.9.5's frame locals (``code_item``, ``mock_kwargs``):
    on the real path it names the approved code, and tells the private pass from the mock's."""
    import syft as sy

    from datasites.errors import Refused
    from datasites.training.runtime import caller_code

    admin = in_process_server.login(email="info@openmined.org", password="changethis")
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [0, 1, 0]})
    dataset = sy.Dataset(name="frames")
    dataset.add_asset(sy.Asset(name="t", data=frame, mock=frame * 0))
    admin.upload_dataset(dataset)
    admin.register(name="Bo", email="bo@uni.edu", password="pw-654321", password_verify="pw-654321")
    bo = in_process_server.login(email="bo@uni.edu", password="pw-654321")
    asset = bo.datasets["frames"].assets[0]

    @sy.syft_function_single_use(data=asset)
    def whoami(data):
        from datasites.training.runtime import caller_code
        from tests.unit import test_syft_boundary as here

        c = caller_code()
        here.SEEN.append((c.code_id, c.code_hash, c.mock))
        return float(data["x"].sum())

    bo.code.request_code_execution(whoami)
    request = next(r for r in admin.requests if r.code.service_func_name == "whoami")
    request.approve()
    SEEN.clear()
    assert bo.code.whoami(data=asset).get() == 6.0
    code = request.code
    assert {(cid, h) for cid, h, _ in SEEN} == {(str(code.id), str(code.code_hash))}
    assert sorted(m for _, _, m in SEEN) == [False, True]  # one private pass, one mock pass
    with pytest.raises(Refused, match="not called by syft"):
        caller_code()


def _functions(module) -> dict[str, str]:  # noqa: ANN001
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    return {n.name: ast.dump(n) for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_both_wings_adapt_syfts_client_with_the_same_code() -> None:
    """The adapter is written once per wing (neither may import the other, and ``policies``
    names no syft): the two copies must stay the same, function for function."""
    from datasites.serving import syft_client
    from researcher import syft_adapter

    ours = _functions(syft_adapter)
    assert {"install", "syft_errors", "check_reply", "public_message"} <= set(ours)
    assert _functions(syft_client) == ours


def test_importing_a_wing_patches_nothing_in_syft_until_it_connects() -> None:
    """Installing the pinned sessions is a call each wing makes before it logs in, never an
    import's side effect: a fresh process that imports both wings' syft modules finds syft's
    client as syft made it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = (
        "from syft.client.client import HTTPConnection\n"
        "before = (HTTPConnection.make_call, HTTPConnection.__dict__['session'])\n"
        "import researcher.sites, datasites.serving.admin, datasites.review.queue\n"
        "assert (HTTPConnection.make_call, HTTPConnection.__dict__['session']) == before\n"
        "from researcher import syft_adapter\n"
        "syft_adapter.install()\n"
        "assert HTTPConnection.make_call._fedsite_session\n"
        "print('ok')\n"
    )
    env = os.environ | {"PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
