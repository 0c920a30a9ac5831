"""The README's walk and the guides' command blocks, read from the files themselves.

- Every ``datasite`` / ``researcher`` line in a ``bash`` block of README.md or docs/ must parse
  against the real CLI (a renamed option or command fails here), every ``python`` block must
  compile and every ``toml`` block load; a ``scripts/X`` it names must exist. No server.
- The README's three walks (data owner, researcher, admin) run command by command on a fresh
  site, and the guides' blocks marked ``<!-- run -->`` run on that same site, after the training
  and before the admin's denial. Only what a reader substitutes is substituted: the folder, the
  port, the data file, the request id. Optional ``[...]`` parts are left out of what runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sklearn.datasets import load_breast_cancer

from tests.conftest import free_port, last_json, run_cli

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUN = "<!-- run -->"
TOOLS = {"datasite": "datasites.cli", "researcher": "researcher.cli"}


def _docs() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _section(text: str, title: str) -> str:
    """From the heading ``title`` to the next heading of its level or above."""
    start = text.index(f"\n{title}\n")
    level = title.split(" ")[0]
    ends = [text.find(f"\n{h} ", start + 1) for h in ("#" * n for n in range(1, len(level) + 1))]
    ends = [e for e in ends if e > 0]
    return text[start : min(ends) if ends else None]


def _blocks(text: str, lang: str) -> list[tuple[bool, str]]:
    """Each fenced block of ``lang``: whether ``<!-- run -->`` marks it, and its body."""
    found = re.finditer(rf"(<!-- run -->\n)?```{lang}\n(.*?)```", text, re.S)
    return [(m.group(1) is not None, m.group(2)) for m in found]


def _lines(block: str, optional: bool = False) -> list[str]:
    """A bash block's lines: comments dropped, ``[optional]`` parts dropped (or, with
    ``optional``, kept without their brackets)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():  # a line continued with '\'
        line = re.sub(r"\s+#.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        line = (
            re.sub(r"\[([^\]]*)\]", r"\1", line) if optional else re.sub(r"\s*\[[^\]]*\]", "", line)
        )
        out.append(line)
    return out


def _commands(block: str) -> list[list[str]]:
    """The ``datasite`` / ``researcher`` commands of a block as argv, ';' splitting them."""
    return [shlex.split(part) for line in _lines(block) for part in _split(line)]


def _split(line: str) -> list[str]:
    """A tool line's commands (``status ...; stop ...``); a shell line (a loop) stays whole."""
    if line.split(" ", 1)[0] not in TOOLS:
        return [line]
    return [part.strip() for part in line.split(";") if part.strip()]


# --- every documented command, parsed ---------------------------------------------------------


def _parse(argv: list[str]) -> None:
    """Resolve ``argv`` through the CLI's click tree the way a shell would run it: an unknown
    command or option, an extra argument or a missing required one raises. Values are not
    converted (a folder need not be a site here)."""
    import importlib

    import click
    import typer

    cmd = typer.main.get_command(importlib.import_module(TOOLS[argv[0]]).app)
    args = [a for a in argv[1:] if a != "--debug"]  # taken off argv before click sees it
    name, parent = argv[0], None
    while True:
        ctx = click.Context(cmd, info_name=name, parent=parent)
        opts, rest, _ = cmd.make_parser(ctx).parse_args(list(args))
        missing = [p.name for p in cmd.params if p.required and opts.get(p.name) is None]
        assert not missing, f"{' '.join(argv)}: {name} needs {missing}"
        if not isinstance(cmd, click.Group):
            assert not rest, f"{' '.join(argv)}: unexpected arguments {rest}"
            return
        if not rest:
            assert cmd.invoke_without_command, f"{' '.join(argv)}: a subcommand is missing"
            return
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"{' '.join(argv)}: no such command {rest[0]!r}"
        name, parent, cmd, args = rest[0], ctx, sub, rest[1:]


def test_every_documented_command_parses() -> None:
    checked = 0
    for path in _docs():
        text = path.read_text()
        for _, block in _blocks(text, "bash"):
            for line in (p for raw in _lines(block, optional=True) for p in _split(raw)):
                argv = shlex.split(line)
                where = f"{path.relative_to(ROOT)}: {line}"
                if argv[0] in TOOLS:
                    try:
                        _parse(argv)
                    except Exception as exc:  # click's usage errors, and the asserts above
                        raise AssertionError(f"{where}: {exc}") from exc
                    checked += 1
                elif argv[0].startswith("scripts/"):
                    assert (ROOT / argv[0]).is_file(), where
        for _, block in _blocks(text, "python"):
            compile(block, str(path), "exec")
        for _, block in _blocks(text, "toml"):
            tomllib.loads(block)
    assert checked > 50, checked  # the guides hold many; none found means the reader broke


# --- the README's walk, and the guides' runnable blocks ------------------------------------------


class Walk:
    """Runs documented commands with the reader's substitutions; every command must exit 0."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = str(free_port())
        self.ids: list[str] = []

    def sub(self, arg: str) -> str:
        if arg == "ID":
            return self.ids[-1]
        if arg == "8081":
            return self.port
        local = ("sites/a", "data.csv", "bank.csv", "federation.toml", "job.py", "runs/1")
        return str(self.root / arg) if arg in local else arg

    def run(self, argv: list[str]):  # noqa: ANN201
        tool, *args = argv
        proc = run_cli(tool, *[self.sub(a) for a in args], check=False)
        assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-2000:])
        return proc

    def run_block(self, lang: str, block: str) -> None:
        """A guide's block as its reader would run it, in the walk's folder."""
        with _cwd(self.root):
            if lang == "python":
                exec(compile(block, "<docs>", "exec"), {"__name__": "__docs__"})  # noqa: S102
                return
            for line in (p for raw in _lines(block) for p in _split(raw)):
                argv = shlex.split(line)
                if argv[0] in TOOLS:
                    self.run(argv)
                else:  # printf and the like: the reader's shell
                    subprocess.run(line, shell=True, check=True, cwd=self.root)  # noqa: S602


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _guide_blocks() -> list[tuple[str, str, str]]:
    """Every ``<!-- run -->`` block of docs/: (page, language, body)."""
    out = []
    for path in _docs()[1:]:
        text = path.read_text()
        for lang in ("bash", "python"):
            out += [(path.name, lang, b) for run, b in _blocks(text, lang) if run]
    return out


def test_the_readme_walked_command_by_command(tmp_path: Path) -> None:
    text = README.read_text()
    owner = _commands(_blocks(_section(text, "### Data owner"), "bash")[0][1])
    researcher_section = _section(text, "### Researcher")
    admin = _commands(_blocks(_section(text, "### Admin"), "bash")[0][1])
    assert [c[:2] for c in owner][:3] == [
        ["datasite", "init"],
        ["datasite", "launch"],
        ["datasite", "upload"],
    ]
    toml = _blocks(text, "toml")[0][1]
    job_py = _blocks(researcher_section, "python")[0][1]
    researcher = _commands(_blocks(researcher_section, "bash")[0][1])
    guides = _guide_blocks()
    assert {page for page, _, _ in guides} >= {"python-api.md", "datasets.md", "users.md"}
    frame = load_breast_cancer(as_frame=True).frame.rename(columns={"target": "label"})
    frame.to_csv(tmp_path / "data.csv", index=False)
    walk = Walk(tmp_path)
    try:
        _walk(walk, owner, researcher, admin, toml, job_py, guides)
    finally:
        run_cli("datasite", "stop", "--dir", str(tmp_path / "sites" / "a"), check=False)


def _walk(walk: Walk, owner, researcher, admin, toml: str, job_py: str, guides) -> None:  # noqa: ANN001, PLR0913
    for cmd in owner:  # init, launch, upload, users add, policy set, budget set, status
        proc = walk.run(cmd)
        if cmd[1:3] == ["users", "add"]:
            password = last_json(proc)["password"]
        if cmd[1] == "status":
            assert last_json(proc)["responding"] is True
    secrets = walk.root / "secrets"
    secrets.mkdir()
    (secrets / "hospital-a").write_text(password)
    from datasites.serving.config import SiteDir

    fingerprint = SiteDir(walk.root / "sites" / "a").tls_fingerprint()  # as init printed it
    toml = toml.replace("8081", walk.port).replace("SHA256-OF-THE-SITE-CERTIFICATE", fingerprint)
    (walk.root / "federation.toml").write_text(toml)
    (walk.root / "job.py").write_text(job_py)

    by_verb = {c[1]: c for c in researcher}
    for verb in ("datasets", "try", "submit", "status"):
        walk.run(by_verb[verb])
    queue = {c[1]: c for c in admin}
    walk.run(queue["requests"])
    listed = last_json(walk.run([*queue["requests"], "--json"]))
    assert [i["status"] for i in listed] == ["pending"] and listed[0]["submitted"]
    walk.ids.append(listed[0]["id"][:8])
    assert "Linear" in walk.run(queue["review"]).stdout
    walk.run(queue["approve"])
    walk.run(by_verb["train"])
    run_dir = walk.root / "runs" / "1"
    assert (run_dir / "model.pt").exists() and (run_dir / "accuracy.png").exists()

    for page, lang, block in guides:  # the Python API's example submits the job once more
        try:
            walk.run_block(lang, block)
        except Exception as exc:
            raise AssertionError(f"docs/{page}: a runnable {lang} block failed: {exc}") from exc
    listed = last_json(walk.run(["datasite", "datasets", "--dir", "sites/a", "--json"]))
    bank = next(d for d in listed if d.get("name") == "bank")
    # what the guide's comment promises
    assert bank["categories"] == {"region": ["north", "south"], "student": ["No", "Yes"]}, bank

    pending = [
        i for i in last_json(walk.run([*queue["requests"], "--json"])) if i["status"] == "pending"
    ]
    assert len(pending) == 1, pending
    walk.ids.append(pending[0]["id"][:8])
    walk.run(queue["deny"])
    status = last_json(walk.run([*by_verb["status"], "--json"]))
    assert {v["status"] for v in status["sites"].values()} == {"denied"}, status

    for cmd in admin[admin.index(queue["audit"]) :]:
        walk.run(cmd)
    spent = last_json(walk.run([*queue["budget"], "--json"]))
    row = next(r for r in spent if r["researcher"] == "ada@uni.edu" and r["dataset"] == "cancer")
    assert 0 < row["epsilon_spent"] <= row["epsilon_total"]
