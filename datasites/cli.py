"""``datasite``: the command data owners and admins use to run and govern a datasite."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from datasites.data.mock import DEFAULT_MOCK_EPSILON
from datasites.errors import DatasiteError
from datasites.serving import channel
from datasites.serving.config import DEFAULT_PORT, SiteDir, init_site, keep_private
from policies.console import emit_json, out, run_cli, table
from policies.errors import FedsiteError, PlanError

if TYPE_CHECKING:  # the CLI imports the ledger only in the commands that use it
    from datasites.ledger.budget import ReleaseMechanism

app = typer.Typer(
    help="Run a datasite: launch it, upload data, add researchers, review jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # rich tracebacks print local variables, and secrets
)
users_app = typer.Typer(help="Researcher accounts.", no_args_is_help=True)
app.add_typer(users_app, name="users")

DirOpt = Annotated[Path, typer.Option("--dir", help="The datasite's directory.")]


def open_site(value: str) -> SiteDir:
    """The one guard of every command on an existing site: ConfigError (one line, exit 1) when
    DIR is not an initialised datasite, checked before anything can be read or written there."""
    site = SiteDir(Path(value))
    site.config()
    return site


SiteOpt = Annotated[
    SiteDir, typer.Option("--dir", parser=open_site, help="The datasite's directory.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@app.command()
def init(
    name: Annotated[str, typer.Argument(help="Site name, e.g. hospital-a.")],
    dir: DirOpt,
    port: Annotated[int, typer.Option(help="HTTP port on loopback.")] = DEFAULT_PORT,
    db_url: Annotated[
        str,
        typer.Option(
            help="postgresql://USER:PASSWORD@HOST:PORT/DB: syft's store and the site's ledger,"
            " approvals and audit in that database (schemas 'syft', 'datasite'). Default: SQLite."
        ),
    ] = "",
    self_signed: Annotated[
        bool, typer.Option(help="Serve HTTPS with a new self-signed certificate.")
    ] = False,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Serve HTTPS with this PEM certificate (and --tls-key).")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The certificate's PEM private key.")] = None,
) -> None:
    """Create DIR with a config, a stable server identity and a generated admin password."""
    tls = _tls_material(self_signed, tls_cert, tls_key)
    if db_url:
        _check_database(db_url)
    config = init_site(dir, name, port=port, db_url=db_url, tls=tls)
    out.print(f"initialised datasite [bold]{config.name}[/bold] in {dir} ({config.url})")
    out.print(f"admin: {config.admin_email}; password in {dir / 'admin-password'} (mode 0600)")
    if tls is not None:
        from policies.tls import fingerprint

        out.print(
            f"TLS certificate fingerprint (SHA-256, researchers pin it): {fingerprint(tls[1])}"
        )


def _check_database(url: str) -> None:
    """Reach the database and create the site's schemas before DIR is written: a wrong URL or
    password is one line now, not a server that dies at launch."""
    from datasites.ledger.store import SiteStore, check_db_url, is_postgres

    check_db_url(url)
    if is_postgres(url):
        SiteStore(url)


def _tls_material(
    self_signed: bool, cert: Path | None, key: Path | None
) -> tuple[bytes, bytes] | None:
    """(key PEM, certificate PEM) from the init options, checked before DIR is created."""
    from policies.tls import fingerprint
    from policies.tls import self_signed as make

    if self_signed and (cert or key):
        raise DatasiteError("give --self-signed, or --tls-cert with --tls-key, not both")
    if self_signed:
        return make("127.0.0.1")
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise DatasiteError("--tls-cert and --tls-key go together")
    try:
        material = key.read_bytes(), cert.read_bytes()
    except OSError as exc:
        raise DatasiteError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    fingerprint(material[1])  # a PEM certificate, or one clear line
    if b"PRIVATE KEY" not in material[0]:
        raise DatasiteError(f"{key} is not a PEM private key")
    return material


@app.command()
def launch(
    site: SiteOpt,
    detach: Annotated[bool, typer.Option(help="Return once the server answers.")] = False,
    json: JsonOpt = False,
) -> None:
    """Start the datasite's syft server; in the foreground Ctrl-C stops it."""
    from datasites.serving import process

    if not detach:
        out.print(f"serving {site.config().name} on {site.config().url}; Ctrl-C stops it")
        process.launch_foreground(site)
    st = process.launch_detached(site)
    if json:
        emit_json(st.to_dict())
    else:
        out.print(f"datasite {st.name} running at {st.url} (pid {st.pid})")


@app.command()
def stop(site: SiteOpt) -> None:
    """Stop the datasite's server."""
    from datasites.serving import process

    stopped = process.stop(site)
    out.print("stopped" if stopped else "not running")


@app.command()
def status(site: SiteOpt, json: JsonOpt = False) -> None:
    """Whether the server runs and answers, with its pid and URL."""
    from datasites.serving import process

    st = process.status(site)
    if json:
        emit_json(st.to_dict())
    else:
        table(
            "datasite",
            ["name", "url", "pid", "running", "responding"],
            [[st.name, st.url, st.pid, st.running, st.responding]],
        )
        out.print(f"identity fingerprint (secure-aggregation peers): {st.fingerprint}")
        out.print(f"database: {st.database}")
        if st.tls_fingerprint:
            out.print(
                f"TLS certificate fingerprint (pin it in federation.toml): {st.tls_fingerprint}"
            )


@app.command()
def upload(
    site: SiteOpt,
    name: Annotated[str, typer.Option(help="Dataset name researchers will see.")],
    file: Annotated[Path, typer.Option(help="CSV or Parquet file.")],
    target: Annotated[str, typer.Option(help="Label column.")],
    description: Annotated[str, typer.Option(help="Free text for researchers.")] = "",
    mock_rows: Annotated[int, typer.Option(help="Rows in the synthetic mock.")] = 1000,
    mock_epsilon: Annotated[
        float,
        typer.Option(
            help="Epsilon (delta 1e-5) the DP mock spends; it counts in every researcher's budget."
        ),
    ] = DEFAULT_MOCK_EPSILON,
    max_categories: Annotated[
        int,
        typer.Option(
            help="A text column with at most this many distinct values is one-hot encoded (its "
            "categories are published as schema); more is refused. Booleans become 0/1."
        ),
    ] = 32,
    max_memory_mb: Annotated[
        int,
        typer.Option(
            help="Memory the upload may use; a table that would need more is refused before "
            "it is read."
        ),
    ] = 1536,
    bounds: Annotated[
        Path | None,
        typer.Option(
            help="TOML, YAML or CSV of public bounds: per numeric column a lower and an upper "
            "value (CSV header column,lower,upper; '*' for every column not named). Published as "
            "schema; values outside are clamped (you alone see how many); no epsilon is spent "
            "finding those columns' ranges."
        ),
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Validate a table and upload it as private data with a differentially private mock twin."""
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise DatasiteError(f"dataset name {name!r} may hold only letters, digits, '-', '_', '.'")
    if name in site.datasets_meta():
        raise DatasiteError(f"a dataset named {name!r} already exists on this site; pick another")
    if not 10 <= mock_rows <= 1_000_000:
        raise DatasiteError(f"--mock-rows must be in [10, 1000000], got {mock_rows}")
    if not 0.01 <= mock_epsilon <= 100:
        raise DatasiteError(f"--mock-epsilon must be in [0.01, 100], got {mock_epsilon}")
    if not 1 <= max_categories <= 1000:
        raise DatasiteError(f"--max-categories must be in [1, 1000], got {max_categories}")
    call = channel.Upload(
        name,
        str(file.resolve()),
        target,
        description,
        mock_rows,
        mock_epsilon,
        max_categories,
        max_memory_mb,
        str(bounds.resolve()) if bounds is not None else "",
    )
    try:  # the server reads and checks the table itself: no row crosses the admin channel
        result = _call(site, call)
    except channel.SiteDown:
        from datasites.data.tables import load_bounds, load_table, validate_table

        # a bad table or bounds file is the line to show, also when the server is down
        table = validate_table(
            load_table(file, max_memory_mb), target, max_categories=max_categories
        )
        if bounds is not None:
            load_bounds(bounds, table)
        raise
    declared = result.clamped if bounds is not None else None
    if json:
        emit_json(result.__dict__)
    else:
        out.print(
            f"uploaded {result.name}: {result.rows} private rows, {result.mock_rows} mock rows "
            f"(DP, epsilon {result.mock_epsilon:g}, public), target {result.target!r}"
        )
        if declared is not None:
            out.print(
                f"bounds declared for {len(declared)} column(s) (public schema); {_clamped(result.clamped)}"
            )
        for line in result.advice:
            out.print(f"note: {line}")


def _clamped(counts: dict[str, int] | None) -> str:
    """The owner's line on clamping: how many values each column had outside its bounds."""
    outside = {c: n for c, n in (counts or {}).items() if n}
    if not outside:
        return "no value lay outside them"
    listed = ", ".join(f"{c} {n}" for c, n in outside.items())
    return f"values clamped to them (yours alone, never published): {listed}"


@app.command()
def datasets(site: SiteOpt, json: JsonOpt = False) -> None:
    """Datasets on this datasite, from the site's own record of its uploads (no server needed)."""
    rows = [
        {
            "name": name,
            "description": meta.get("description", ""),
            **{
                k: meta.get(k)
                for k in ("target", "rows", "mock_rows", "mock_epsilon", "schema", "categories")
            },
            "bounds": meta.get("bounds") if meta.get("bounds_source") else None,
            "bounds_source": meta.get("bounds_source"),
            "clamped": (meta.get("owner_only") or {}).get("clamped"),
            "private_rows": _private_rows(site, name),
        }
        for name, meta in sorted(site.datasets_meta().items())
    ]
    if json:
        emit_json(rows)
    else:
        table(
            "datasets",
            [
                "name",
                "private rows",
                "published rows (DP)",
                "mock rows (DP)",
                "target",
                "columns",
                "declared bounds",
                "clamped",
                "description",
            ],
            [
                [
                    r["name"],
                    r["private_rows"],
                    r["rows"],
                    r["mock_rows"],
                    r["target"],
                    len(r["schema"] or []),
                    sum(s == "declared" for s in (r["bounds_source"] or {}).values()),
                    _clamped_short(r["clamped"]),
                    r["description"],
                ]
                for r in rows
            ],
        )


def _private_rows(site: SiteDir, name: str) -> int | None:
    """The exact row count of the owner's private table (its Parquet file's footer): the owner's
    alone; researchers see the published DP count."""
    import pyarrow.parquet as pq

    from datasites.data.store import tables_dir

    files = sorted(tables_dir(site.root).glob(f"{name}-*.parquet"))
    return pq.ParquetFile(files[-1]).metadata.num_rows if files else None


def _clamped_short(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "-"
    outside = {c: n for c, n in counts.items() if n}
    return ", ".join(f"{c} {n}" for c, n in outside.items()) or "0"


@users_app.command("add")
def users_add(
    site: SiteOpt,
    email: Annotated[str, typer.Option(help="The researcher's email (their login).")],
    name: Annotated[str, typer.Option(help="The researcher's name.")],
    json: JsonOpt = False,
) -> None:
    """Register a researcher and show their initial password once."""
    password = _call(site, channel.UsersAdd(email, name)).password
    if json:
        emit_json({"email": email, "password": password})
    else:
        out.print(f"added {email}; initial password (shown once): {password}")


@users_app.command("remove")
def users_remove(
    site: SiteOpt, email: Annotated[str, typer.Option(help="The researcher's email.")]
) -> None:
    """Delete a researcher's account (the ledger and audit log keep what they did)."""
    _call(site, channel.UsersRemove(email))
    out.print(f"removed {email}")


@users_app.command("reset-password")
def users_reset_password(
    site: SiteOpt,
    email: Annotated[str, typer.Option(help="The researcher's email.")],
    json: JsonOpt = False,
) -> None:
    """Give a researcher a new generated password, shown once; the old one stops working."""
    password = _call(site, channel.ResetPassword(email)).password
    if json:
        emit_json({"email": email, "password": password})
    else:
        out.print(f"new password for {email} (shown once): {password}")


@users_app.command("list")
def users_list(site: SiteOpt, json: JsonOpt = False) -> None:
    """Accounts on this datasite."""
    rows = _call(site, channel.UsersList()).users
    if json:
        emit_json(rows)
    else:
        table(
            "users", ["email", "name", "role"], [[r["email"], r["name"], r["role"]] for r in rows]
        )


policy_app = typer.Typer(help="Per-dataset access and DP policies.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
budget_app = typer.Typer(help="The privacy budget ledger.", invoke_without_command=True)
app.add_typer(budget_app, name="budget")


@policy_app.command("show")
def policy_show(
    site: SiteOpt, dataset: Annotated[str, typer.Option()] = "", json: JsonOpt = False
) -> None:
    """Policies of every dataset (or one); datasets without one get the conservative default."""
    from datasites.review.access import PolicyStore

    if dataset:  # without --dataset: every dataset's policy
        _known_dataset(site, dataset)
    store = PolicyStore(site.policies_path)
    names = [dataset] if dataset else sorted(set(site.datasets_meta()) | set(store.all()))
    caps = _caps(site)
    data = {
        n: {**store.get(n).to_dict(), "max_total_epsilon": caps.get(n, (None, None))[0]}
        for n in names
    }
    if json:
        emit_json(data)
    else:
        for name, policy in data.items():
            table(f"policy: {name}", ["field", "value"], [[k, v] for k, v in policy.items()])


def _caps(site: SiteDir) -> dict[str, tuple[float, float]]:
    """Each capped dataset's (epsilon, delta), read from the ledger's table alone: no
    accountant is imported for a listing."""
    from datasites.ledger.store import SiteStore

    with SiteStore(site.site_db).connect() as conn:
        rows = conn.execute("SELECT dataset, epsilon_total, delta FROM dataset_caps").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


@policy_app.command("set")
def policy_set(
    site: SiteOpt,
    dataset: Annotated[str, typer.Option(help="Dataset the policy governs.")],
    allow: Annotated[list[str], typer.Option(help="Researcher email allowed (repeatable).")] = [],  # noqa: B006
    allow_domain: Annotated[
        list[str], typer.Option(help="Email domain allowed (repeatable).")
    ] = [],  # noqa: B006
    revoke: Annotated[
        list[str],
        typer.Option(
            help="Researcher email to remove (repeatable); takes effect at the next round."
        ),
    ] = [],  # noqa: B006
    trust_peer: Annotated[
        list[str],
        typer.Option(
            help="A datasite's identity fingerprint this dataset may aggregate with (repeatable;"
            " 'datasite status' prints a site's own)."
        ),
    ] = [],  # noqa: B006
    untrust_peer: Annotated[
        list[str], typer.Option(help="A fingerprint to remove from the trusted peers.")
    ] = [],  # noqa: B006
    revoke_domain: Annotated[
        list[str], typer.Option(help="Email domain to remove (repeatable).")
    ] = [],  # noqa: B006
    max_epsilon_per_job: Annotated[float | None, typer.Option()] = None,
    max_delta: Annotated[float | None, typer.Option()] = None,
    min_noise_multiplier: Annotated[float | None, typer.Option()] = None,
    max_grad_norm: Annotated[float | None, typer.Option()] = None,
    max_rounds: Annotated[int | None, typer.Option()] = None,
    max_parameters: Annotated[int | None, typer.Option()] = None,
    max_seconds_per_round: Annotated[
        float | None, typer.Option(help="Wall time a round may take in the trainer.")
    ] = None,
    max_memory_mb: Annotated[
        int | None, typer.Option(help="Memory a round may add to the trainer process.")
    ] = None,
    require_secure_aggregation: Annotated[
        bool | None,
        typer.Option(
            "--require-secure-aggregation/--allow-plain-aggregation",
            help="Refuse jobs whose updates the researcher would see one by one.",
        ),
    ] = None,
    min_aggregation_sites: Annotated[
        int | None, typer.Option(help="Fewest sites in a secure-aggregation round (k).")
    ] = None,
    colluding_sites: Annotated[
        int | None,
        typer.Option(
            help="Distributed DP: sites that may pool their noise; the rest must suffice (t)."
        ),
    ] = None,
    max_total_epsilon: Annotated[
        float | None,
        typer.Option(
            help="Cap on every release on the dataset, over all researchers and the public mock"
            " (the data subjects' guarantee); a job that would pass it is refused."
        ),
    ] = None,
    max_total_delta: Annotated[
        float | None, typer.Option(help="Delta of that cap (default 1e-5).")
    ] = None,
) -> None:
    """Change a dataset's policy; unnamed fields keep their current value."""
    from dataclasses import replace

    from datasites.review.access import PolicyStore

    _known_dataset(site, dataset)
    if max_total_delta is not None and max_total_epsilon is None:
        raise DatasiteError("--max-total-delta goes with --max-total-epsilon")
    if max_total_epsilon is not None:
        from datasites.ledger.budget import DEFAULT_DELTA, check_budget

        max_total_delta = DEFAULT_DELTA if max_total_delta is None else max_total_delta
        check_budget(max_total_epsilon, max_total_delta)  # before anything is written
    store = PolicyStore(site.policies_path)
    changes: dict[str, Any] = {
        k: v
        for k, v in {
            "max_epsilon_per_job": max_epsilon_per_job,
            "max_delta": max_delta,
            "min_noise_multiplier": min_noise_multiplier,
            "max_grad_norm": max_grad_norm,
            "max_rounds": max_rounds,
            "max_parameters": max_parameters,
            "max_seconds_per_round": max_seconds_per_round,
            "max_memory_mb": max_memory_mb,
            "require_secure_aggregation": require_secure_aggregation,
            "min_aggregation_sites": min_aggregation_sites,
            "colluding_sites": colluding_sites,
        }.items()
        if v is not None
    }
    current = store.get(dataset)
    if set(allow) & set(revoke) or set(allow_domain) & set(revoke_domain):
        raise DatasiteError("the same email or domain cannot be both allowed and revoked")
    if allow or revoke:
        gone_emails = {e.lower() for e in revoke}  # emails compare case-insensitively, as allows()
        emails = {*current.allowed_researchers, *allow}
        changes["allowed_researchers"] = sorted(e for e in emails if e.lower() not in gone_emails)
    if allow_domain or revoke_domain:
        gone = {d.lower().lstrip("@") for d in revoke_domain}
        domains = {*current.allowed_domains, *allow_domain}
        changes["allowed_domains"] = sorted(d for d in domains if d.lower().lstrip("@") not in gone)
    if trust_peer or untrust_peer:
        peers = {p.lower() for p in (*current.trusted_peers, *trust_peer)}
        changes["trusted_peers"] = sorted(peers - {p.lower() for p in untrust_peer})
    policy = replace(current, **changes)
    policy.validate()  # before the cap is written: all of it, or nothing
    if max_total_epsilon is not None:
        _set_cap(site, dataset, max_total_epsilon, max_total_delta or 0.0)
    store.set(dataset, policy)
    out.print(f"policy of {dataset} updated")


def _set_cap(site: SiteDir, dataset: str, epsilon: float, delta: float) -> None:
    """Cap the dataset's total in the ledger (where reserve reads it, under its lock)."""
    from datasites.ledger.budget import BudgetLedger
    from datasites.ledger.store import SiteStore

    ledger = BudgetLedger(SiteStore(site.site_db))
    ledger.set_cap(dataset, epsilon, delta)
    total = ledger.total(dataset)
    out.print(
        f"total epsilon on {dataset} capped at {epsilon:g} (delta {delta:g}), over every "
        f"researcher and the public mock: {total.epsilon_spent:.3f} spent, "
        f"{total.remaining:.3f} left"
    )


@app.command()
def requests(site: SiteOpt, json: JsonOpt = False) -> None:
    """Submitted jobs with their automatic policy report."""
    items = _call(site, channel.Requests()).items
    if json:
        emit_json(items)
        return
    table(
        "requests",
        [
            "id",
            "job",
            "submitted (UTC)",
            "researcher",
            "status",
            "dataset",
            "report",
            "failed checks",
        ],
        [
            [
                i["id"][:8],
                i["job"],
                i["submitted"],
                i["researcher"],
                i["status"],
                i["dataset"] or "",
                "pass" if i["report"]["passed"] else "FAIL",
                ", ".join(c["name"] for c in i["report"]["checks"] if not c["passed"]),
            ]
            for i in items
        ],
        whole=["id", "submitted (UTC)"],
    )


@app.command()
def review(
    site: SiteOpt,
    request_id: Annotated[str, typer.Argument(help="Request id (prefix).")],
    json: JsonOpt = False,
) -> None:
    """Show a request's code and its policy report."""
    from rich.syntax import Syntax

    reply = _call(site, channel.Review(request_id))
    item = reply.item
    if json:
        emit_json({**item, "code": reply.code})
        return
    out.print(Syntax(reply.code[:4000], "python", word_wrap=True))
    if reply.plan_rows is not None:
        report = item["report"]
        table(
            f"model: {report['parameters']} trainable parameters, input {reply.model_input}",
            ["layer", "type", "output shape", "parameters"],
            [
                [r["layer"], r["type"], str(r["output"]), str(r["params"])]
                for r in report["architecture"]
            ],
        )
        table("plan (what each round runs here)", ["field", "value"], reply.plan_rows)
    print_report(item)


def print_report(item: dict) -> None:
    """A request's policy report, from its ``to_dict()`` as the admin channel sends it."""
    report = item["report"]
    verdict = "[green]PASSED[/green]" if report["passed"] else "[red]FAILED[/red]"
    table(
        f"policy report for {item['id'][:8]} from {item['researcher']}: {verdict}",
        ["check", "result", "reason"],
        [[c["name"], "ok" if c["passed"] else "FAIL", c["reason"]] for c in report["checks"]]
        + [[w["name"], "warn", w["reason"]] for w in report.get("warnings", [])],
    )
    if report.get("warnings"):
        out.print(
            "warnings do not block approval: the job may train to the majority class and "
            "still spend its epsilon; the researcher sees the same warnings",
            style="dim",
        )


@app.command()
def approve(
    site: SiteOpt,
    request_id: Annotated[str, typer.Argument(help="Request id (prefix).")],
    override: Annotated[bool, typer.Option(help="Approve although the report fails.")] = False,
    reason: Annotated[str, typer.Option(help="Why (required with --override).")] = "",
) -> None:
    """Approve a request whose policy report passes (or override, with a recorded reason)."""
    if override and not reason.strip():
        raise DatasiteError("--override needs --reason TEXT, which is recorded")
    item = _call(site, channel.Approve(request_id, override, reason)).item
    print_report(item)
    out.print(f"approved {item['id'][:8]} from {item['researcher']}")


@app.command()
def deny(
    site: SiteOpt,
    request_id: Annotated[str, typer.Argument(help="Request id (prefix).")],
    reason: Annotated[str, typer.Option(help="Shown to the researcher.")] = "",
) -> None:
    """Deny a request with a reason the researcher will see."""
    if not reason.strip():
        raise DatasiteError("deny needs --reason TEXT; the researcher sees it")
    item = _call(site, channel.Deny(request_id, reason)).item
    out.print(f"denied {item['id'][:8]} from {item['researcher']}")


@app.command()
def audit(site: SiteOpt, json: JsonOpt = False) -> None:
    """The append-only audit log (its hash chain is verified on every read)."""
    from datasites.ledger.audit import AuditLog
    from datasites.ledger.store import SiteStore

    log = AuditLog(SiteStore(site.site_db), site.root)
    problem = log.problem()
    if problem is not None:
        raise DatasiteError(f"the audit log was tampered with: {problem}")
    entries = log.entries()
    if json:
        emit_json(entries)
        return
    table(
        "audit log (chain verified)",
        ["#", "at", "actor", "event", "request", "code", "detail"],
        [
            [
                e["seq"],
                e["at"],
                e["actor"],
                e["event"],
                (e["request_id"] or "")[:8],
                (e["code_hash"] or "")[:10],
                _short(e["detail"]),
            ]
            for e in entries
        ],
    )


@app.command()
def models(site: SiteOpt, json: JsonOpt = False) -> None:
    """Personalized models fine-tuned here (plan.personalize_*): they never leave this site."""
    from datasites.ledger.store import SiteStore
    from datasites.training.job_state import JobState

    rows = JobState(SiteStore(site.site_db)).models()
    if json:
        emit_json(rows)
        return
    table(
        "personalized models (kept at this site; only their DP metrics were released)",
        ["request", "job", "researcher", "dataset", "at", "val_accuracy (DP)"],
        [
            [
                r["request"][:8],
                r["job"],
                r["researcher"],
                r["dataset"],
                r["at"][:19],
                _fmt(r.get("metrics", {}).get("val_accuracy")),
            ]
            for r in rows
        ],
        whole=["request"],
    )


@app.command()
def console(
    site: SiteOpt,
    port: Annotated[int, typer.Option(help="Port of the console on 127.0.0.1.")] = 8900,
    login_delay: Annotated[
        float,
        typer.Option(
            help="Seconds of the first wait after three wrong passwords (doubling after each "
            "further one); at least 1."
        ),
    ] = 1.0,
) -> None:
    """Serve the admin web console on loopback (log in with the admin password); Ctrl-C stops it."""
    from datasites.console.app import server
    from datasites.console.sessions import check_delay

    if not 1 <= port <= 65535:
        raise DatasiteError(f"port {port} is outside 1-65535")
    try:
        check_delay(login_delay)
    except ValueError as e:
        raise DatasiteError(f"--login-delay: {e}") from None
    live(site)
    out.print(f"console of {site.config().name} on http://127.0.0.1:{port} (Ctrl-C stops it)")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the console stops, exit 0
        server(site, port, login_delay).run()


limits_app = typer.Typer(
    help="Site-wide request and storage limits (size of a request, researchers' uploads).",
    no_args_is_help=True,
)
app.add_typer(limits_app, name="limits")


@limits_app.command("show")
def limits_show(site: SiteOpt, json: JsonOpt = False) -> None:
    """The limits in force: set by the admin, or derived from the largest model allowed."""
    from dataclasses import asdict

    from datasites.serving.limits import effective, read_limits

    now, own = effective(site), read_limits(site)
    if json:
        emit_json({"effective": now.to_dict(), "set": asdict(own)})
        return
    table(
        "limits",
        ["limit", "in force", "set by the admin (0: derived)"],
        [
            ["request body (bytes)", now.request_bytes, own.max_request_mb],
            ["uploads held per researcher (bytes)", now.quota_bytes, own.quota_mb],
            ["uploads held per researcher (objects)", now.quota_objects, own.quota_objects],
        ],
    )
    out.print(f"derived from the largest model any policy allows: {now.derived_from} parameters")


@limits_app.command("set")
def limits_set(
    site: SiteOpt,
    max_request_mb: Annotated[
        float | None,
        typer.Option(help="Largest request body in MiB (0: derived from the policies)."),
    ] = None,
    quota_mb: Annotated[
        float | None,
        typer.Option(help="MiB of uploads a researcher may hold at once (0: derived)."),
    ] = None,
    quota_objects: Annotated[
        int | None, typer.Option(help="Uploads a researcher may hold at once.")
    ] = None,
) -> None:
    """Change the limits; a running server applies them to its next request."""
    from dataclasses import replace

    from datasites.serving.limits import read_limits, write_limits

    changes: dict[str, Any] = {
        k: v
        for k, v in {
            "max_request_mb": max_request_mb,
            "quota_mb": quota_mb,
            "quota_objects": quota_objects,
        }.items()
        if v is not None
    }
    write_limits(site, replace(read_limits(site), **changes))
    out.print("limits updated")


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _short(detail: dict) -> str:
    text = ", ".join(f"{k}={v}" for k, v in detail.items() if k not in ("checks",))
    return text if len(text) < 90 else text[:87] + "..."


@budget_app.callback()
def budget(
    ctx: typer.Context,
    dir: Annotated[Path | None, typer.Option("--dir")] = None,
    json: JsonOpt = False,
) -> None:
    """Show the ledger: per researcher and dataset, epsilon allowed and spent."""
    if ctx.invoked_subcommand is not None:
        return
    if dir is None:
        raise DatasiteError("budget needs --dir DIR")
    site = open_site(str(dir))
    rows, public, totals = _budget_rows(site)
    if json:
        emit_json(rows)  # public releases are in each row's releases, marked "public"
        return
    if public:
        table(
            "public releases (seen by everyone: in every researcher's spend on the dataset)",
            ["dataset", "kind", "mechanism", "epsilon", "delta"],
            [
                [
                    r["dataset"],
                    r["kind"],
                    _mechanism_text(r["mechanism"]),
                    f"{r['epsilon']:.3f}",
                    "1e-05",
                ]
                for r in public
            ],
        )
    table(
        "privacy budgets (dataset total: every researcher and the public mock, composed)",
        [
            "researcher",
            "dataset",
            "epsilon spent",
            "epsilon total",
            "delta",
            "jobs",
            "dataset total / cap",
        ],
        [
            [
                r["researcher"],
                r["dataset"],
                f"{r['epsilon_spent']:.3f}",
                f"{r['epsilon_total']:.3f}",
                r["delta"],
                r["charges"],
                _total_text(r["dataset_total"]),
            ]
            for r in rows
        ],
    )
    alone = [t for name, t in totals.items() if name not in {r["dataset"] for r in rows}]
    if alone:  # capped, or spent by the public mock only: no researcher row shows them
        table(
            "datasets no researcher has spent on yet",
            ["dataset", "dataset total / cap"],
            [[t["dataset"], _total_text(t)] for t in alone],
        )
    releases = [
        (r["researcher"], r["dataset"], rel)
        for r in rows
        for rel in r["releases"]
        if not rel["public"]
    ]
    if releases:
        table(
            "every charged release (composed into 'epsilon spent' above)",
            ["researcher", "dataset", "kind", "job", "mechanism", "epsilon alone", "status"],
            [
                [
                    who,
                    dataset,
                    rel["kind"],
                    rel["job"][:12],
                    _mechanism_text(rel["mechanism"]),
                    f"{rel['epsilon']:.3f}",
                    rel["status"],
                ]
                for who, dataset, rel in releases
            ],
        )


def _budget_rows(site: SiteDir) -> tuple[list[dict], list[dict], dict[str, dict]]:
    """The ledger's rows, public releases and dataset totals: from the running server (fast),
    or, when it is stopped, read here (the ledger needs the accountant's import, seconds)."""
    try:
        reply = _call(site, channel.Budget())
        return reply.rows, reply.public, reply.totals
    except channel.SiteDown:
        pass
    from datasites.ledger.budget import BudgetLedger
    from datasites.ledger.store import SiteStore
    from datasites.serving.channel_server import ledger_rows

    return ledger_rows(BudgetLedger(SiteStore(site.site_db)))


def _total_text(total: dict | None) -> str:
    if total is None:
        return ""
    if total["epsilon_cap"] is None:
        return f"{total['epsilon_spent']:.3f} / no cap"
    return (
        f"{total['epsilon_spent']:.3f} / {total['epsilon_cap']:.3f} "
        f"({total['epsilon_remaining']:.3f} left)"
    )


def _mechanism_text(m: ReleaseMechanism) -> str:
    if m["sample_rate"] >= 1.0:
        return f"gaussian x{m['steps']}, noise {m['noise_multiplier']:.3g}"
    return f"DP-SGD {m['steps']} steps, noise {m['noise_multiplier']:.3g}, q {m['sample_rate']:.3g}"


@budget_app.command("set")
def budget_set(
    site: SiteOpt,
    researcher: Annotated[str, typer.Option(help="Researcher email.")],
    dataset: Annotated[str, typer.Option()],
    epsilon: Annotated[float, typer.Option(help="Total epsilon allowed.")],
    delta: Annotated[float, typer.Option(help="Delta of the budget.")] = 1e-5,
) -> None:
    """Set the total privacy budget of a researcher (an account on this site) on a dataset."""
    _known_dataset(site, dataset)
    if not (0 < epsilon < math.inf) or not 0 < delta < 1:  # as check_budget, before any call
        raise PlanError("a budget needs a finite epsilon > 0 and 0 < delta < 1")
    _call(site, channel.BudgetSet(researcher, dataset, epsilon, delta))  # checks the account
    out.print(f"budget of {researcher} on {dataset}: epsilon {epsilon}, delta {delta}")


def _call(site: SiteDir, message: object) -> Any:
    """One call to this site's running server over its admin channel (``serving.channel``)."""
    return channel.call(site.root, message, site.config().url)


def live(site: SiteDir) -> None:
    """One line, at once, when the server is down: before syft's import and the login."""
    from datasites.serving.process import require_answering

    require_answering(site)


def _known_dataset(site: SiteDir, dataset: str) -> None:
    known = site.datasets_meta()
    if dataset not in known:
        listed = ", ".join(sorted(known)) or "none yet"
        raise DatasiteError(f"no dataset {dataset!r} on this site (uploaded: {listed})")


def main() -> None:
    keep_private()  # site.db, server.log, uploads: whatever a command creates is 0600
    run_cli(app, (FedsiteError,))


if __name__ == "__main__":
    main()
