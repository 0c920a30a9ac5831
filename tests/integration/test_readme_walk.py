"""The README, both sections, command by command, on a fresh site dir.

The commands are read from the README itself (the data owner's ``bash`` block, the researcher's
``toml``, ``python`` and ``bash`` blocks), so that a README that stops working fails here. Only
what a reader substitutes is substituted: the folder, the port, the data file, the request id.
Optional ``[...]`` parts are left out.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from sklearn.datasets import load_breast_cancer

from tests.conftest import free_port, last_json, run_cli

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def _commands(block: str) -> list[list[str]]:
    """Each command of a bash block as argv: comments, ``[optional]`` parts and ';' split."""
    out = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"\s*\[[^\]]*\]", "", line)
        out += [shlex.split(part) for part in line.split(";") if part.strip()]
    return out


class Walk:
    """Runs README commands with the reader's substitutions; every command must exit 0."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = str(free_port())
        self.ids: list[str] = []

    def sub(self, arg: str) -> str:
        table = {
            "sites/a": str(self.root / "sites" / "a"),
            "8081": self.port,
            "data.csv": str(self.root / "data.csv"),
            "federation.toml": str(self.root / "federation.toml"),
            "job.py": str(self.root / "job.py"),
            "runs/1": str(self.root / "runs" / "1"),
        }
        if arg == "ID":
            return self.ids[-1]
        return table.get(arg, arg)

    def run(self, argv: list[str]):  # noqa: ANN201
        tool, *args = argv
        proc = run_cli(tool, *[self.sub(a) for a in args], check=False)
        assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-2000:])
        return proc


def test_the_readme_walked_command_by_command(tmp_path: Path) -> None:
    owner = _commands(_blocks(_section("For data owners"), "bash")[0])
    researcher_section = _section("For researchers")
    toml = _blocks(researcher_section, "toml")[0]
    job_py = _blocks(researcher_section, "python")[0]
    researcher = _commands(_blocks(researcher_section, "bash")[0])
    assert [c[:2] for c in owner][:3] == [
        ["datasite", "init"],
        ["datasite", "launch"],
        ["datasite", "upload"],
    ]
    frame = load_breast_cancer(as_frame=True).frame.rename(columns={"target": "label"})
    frame.to_csv(tmp_path / "data.csv", index=False)
    walk = Walk(tmp_path)
    stop = [c for c in owner if c[1] == "stop"]
    try:
        _walk(walk, owner, researcher, toml, job_py)
    finally:
        for c in stop:
            run_cli(*[walk.sub(a) for a in c], check=False)


def _walk(walk: Walk, owner: list, researcher: list, toml: str, job_py: str) -> None:  # noqa: ANN001
    before_review = [c for c in owner if c[1] not in ("requests", "review", "approve", "deny")]
    setup = before_review[: next(i for i, c in enumerate(before_review) if c[1] == "audit")]
    for cmd in setup:  # init, launch, upload, users add, policy set, budget set
        proc = walk.run(cmd)
        if cmd[1:3] == ["users", "add"]:
            password = last_json(proc)["password"]
    secrets = walk.root / "secrets"
    secrets.mkdir()
    (secrets / "hospital-a").write_text(password)
    from datasites.serving.config import SiteDir

    fingerprint = SiteDir(walk.root / "sites" / "a").tls_fingerprint()  # as init printed it
    toml = toml.replace("8081", walk.port).replace("SHA256-OF-THE-SITE-CERTIFICATE", fingerprint)
    (walk.root / "federation.toml").write_text(toml)
    (walk.root / "job.py").write_text(job_py)

    by_verb = {c[1]: c for c in researcher if "--resume" not in c}
    for verb in ("datasets", "try", "submit", "status"):
        walk.run(by_verb[verb])
    queue = {c[1]: c for c in owner}
    listed = last_json(walk.run([*queue["requests"], "--json"]))
    assert [i["status"] for i in listed] == ["pending"] and listed[0]["submitted"]
    walk.ids.append(listed[0]["id"][:8])
    assert "Linear" in walk.run(queue["review"]).stdout
    walk.run(queue["approve"])
    walk.run(by_verb["train"])
    run_dir = walk.root / "runs" / "1"
    assert (run_dir / "model.pt").exists() and (run_dir / "accuracy.png").exists()
    walk.run(next(c for c in researcher if "--resume" in c))

    walk.run(by_verb["submit"])  # a second request, for the deny line
    pending = [
        i for i in last_json(walk.run([*queue["requests"], "--json"])) if i["status"] == "pending"
    ]
    walk.ids.append(pending[0]["id"][:8])
    walk.run(queue["deny"])
    status = last_json(walk.run([*by_verb["status"], "--json"]))
    assert {v["status"] for v in status["sites"].values()} == {"denied"}, status

    rest = owner[owner.index(queue["audit"]) :]
    for cmd in rest:
        proc = walk.run(cmd)
        if cmd[1] == "status":
            assert last_json(proc)["responding"] is True
    spent = last_json(walk.run([*queue["budget"], "--json"]))
    row = next(r for r in spent if r["researcher"] == "ada@uni.edu")
    assert 0 < row["epsilon_spent"] <= row["epsilon_total"]
