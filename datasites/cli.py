"""``datasite``: the command data owners and admins use to run and govern a datasite."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from datasites.config import DEFAULT_PORT, SiteDir, init_site
from datasites.errors import DatasiteError
from policies.console import emit_json, out, run_cli, table
from policies.errors import PolicyError

app = typer.Typer(help="Run a datasite: launch it, upload data, add researchers, review jobs.",
                  no_args_is_help=True, add_completion=False)
users_app = typer.Typer(help="Researcher accounts.", no_args_is_help=True)
app.add_typer(users_app, name="users")

DirOpt = Annotated[Path, typer.Option("--dir", help="The datasite's directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@app.command()
def init(
    name: Annotated[str, typer.Argument(help="Site name, e.g. hospital-a.")],
    dir: DirOpt,
    port: Annotated[int, typer.Option(help="HTTP port on loopback.")] = DEFAULT_PORT,
    db_url: Annotated[str, typer.Option(help="SQLAlchemy URL for syft's database.")] = "",
) -> None:
    """Create DIR with a config, a stable server identity and a generated admin password."""
    config = init_site(dir, name, port=port, db_url=db_url)
    out.print(f"initialised datasite [bold]{config.name}[/bold] in {dir} ({config.url})")
    out.print(f"admin: {config.admin_email}; password in {dir / 'admin-password'} (mode 0600)")


@app.command()
def launch(
    dir: DirOpt,
    detach: Annotated[bool, typer.Option(help="Return once the server answers.")] = False,
    json: JsonOpt = False,
) -> None:
    """Start the datasite's syft server; in the foreground Ctrl-C stops it."""
    from datasites import process

    site = SiteDir(dir)
    if not detach:
        out.print(f"serving {site.config().name} on {site.config().url}; Ctrl-C stops it")
        process.launch_foreground(site)
    st = process.launch_detached(site)
    if json:
        emit_json(st.to_dict())
    else:
        out.print(f"datasite {st.name} running at {st.url} (pid {st.pid})")


@app.command()
def stop(dir: DirOpt) -> None:
    """Stop the datasite's server."""
    from datasites import process

    stopped = process.stop(SiteDir(dir))
    out.print("stopped" if stopped else "not running")


@app.command()
def status(dir: DirOpt, json: JsonOpt = False) -> None:
    """Whether the server runs and answers, with its pid and URL."""
    from datasites import process

    st = process.status(SiteDir(dir))
    if json:
        emit_json(st.to_dict())
    else:
        table("datasite", ["name", "url", "pid", "running", "responding"],
              [[st.name, st.url, st.pid, st.running, st.responding]])


@app.command()
def upload(
    dir: DirOpt,
    name: Annotated[str, typer.Option(help="Dataset name researchers will see.")],
    file: Annotated[Path, typer.Option(help="CSV or Parquet file.")],
    target: Annotated[str, typer.Option(help="Label column.")],
    description: Annotated[str, typer.Option(help="Free text for researchers.")] = "",
    mock_rows: Annotated[int, typer.Option(help="Rows in the synthetic mock.")] = 1000,
    json: JsonOpt = False,
) -> None:
    """Validate a table and upload it as private data with a synthetic mock twin."""
    from datasites import admin

    result = admin.upload(SiteDir(dir), name, file, target, description, mock_rows)
    if json:
        emit_json(result.__dict__)
    else:
        out.print(f"uploaded {result.name}: {result.rows} private rows, "
                  f"{result.mock_rows} mock rows, target {result.target!r}")


@app.command()
def datasets(dir: DirOpt, json: JsonOpt = False) -> None:
    """Datasets on this datasite."""
    from datasites import admin

    rows = admin.list_datasets(admin.admin_client(SiteDir(dir)))
    if json:
        emit_json(rows)
    else:
        table("datasets", ["name", "rows", "target", "columns", "description"],
              [[r["name"], r["rows"], r["target"], len(r["schema"] or []), r["description"]]
               for r in rows])


@users_app.command("add")
def users_add(
    dir: DirOpt,
    email: Annotated[str, typer.Option(help="The researcher's email (their login).")],
    name: Annotated[str, typer.Option(help="The researcher's name.")],
    json: JsonOpt = False,
) -> None:
    """Register a researcher and show their initial password once."""
    from datasites import admin

    password = admin.add_user(SiteDir(dir), email, name)
    if json:
        emit_json({"email": email, "password": password})
    else:
        out.print(f"added {email}; initial password (shown once): {password}")


@users_app.command("list")
def users_list(dir: DirOpt, json: JsonOpt = False) -> None:
    """Accounts on this datasite."""
    from datasites import admin

    rows = admin.list_users(admin.admin_client(SiteDir(dir)))
    if json:
        emit_json(rows)
    else:
        table("users", ["email", "name", "role"], [[r["email"], r["name"], r["role"]] for r in rows])


def main() -> None:
    run_cli(app, (DatasiteError, PolicyError))


if __name__ == "__main__":
    main()
