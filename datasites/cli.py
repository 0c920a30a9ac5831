"""``datasite``: the command data owners and admins use to run and govern a datasite."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from datasites.data.mock import DEFAULT_MOCK_EPSILON
from datasites.errors import DatasiteError
from datasites.serving.config import DEFAULT_PORT, SiteDir, init_site, keep_private
from policies.console import emit_json, out, run_cli, table
from policies.errors import FedsiteError

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
    json: JsonOpt = False,
) -> None:
    """Validate a table and upload it as private data with a differentially private mock twin."""
    from datasites.data.tables import load_table, validate_table

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
    # before syft's slow import
    table = validate_table(
        load_table(file, max_memory_mb=max_memory_mb), target, max_categories=max_categories
    )
    live(site)
    from datasites.serving import admin

    result = admin.upload(site, name, table, description, mock_rows, mock_epsilon)
    if json:
        emit_json(result.__dict__)
    else:
        out.print(
            f"uploaded {result.name}: {result.rows} private rows, {result.mock_rows} mock rows "
            f"(DP, epsilon {result.mock_epsilon:g}, public), target {result.target!r}"
        )


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
        }
        for name, meta in sorted(site.datasets_meta().items())
    ]
    if json:
        emit_json(rows)
    else:
        table(
            "datasets",
            ["name", "rows", "target", "columns", "description"],
            [
                [r["name"], r["rows"], r["target"], len(r["schema"] or []), r["description"]]
                for r in rows
            ],
        )


@users_app.command("add")
def users_add(
    site: SiteOpt,
    email: Annotated[str, typer.Option(help="The researcher's email (their login).")],
    name: Annotated[str, typer.Option(help="The researcher's name.")],
    json: JsonOpt = False,
) -> None:
    """Register a researcher and show their initial password once."""
    live(site)
    from datasites.serving import admin

    password = admin.add_user(site, email, name)
    if json:
        emit_json({"email": email, "password": password})
    else:
        out.print(f"added {email}; initial password (shown once): {password}")


@users_app.command("remove")
def users_remove(
    site: SiteOpt, email: Annotated[str, typer.Option(help="The researcher's email.")]
) -> None:
    """Delete a researcher's account (the ledger and audit log keep what they did)."""
    live(site)
    from datasites.serving import admin

    admin.remove_user(site, email)
    out.print(f"removed {email}")


@users_app.command("reset-password")
def users_reset_password(
    site: SiteOpt,
    email: Annotated[str, typer.Option(help="The researcher's email.")],
    json: JsonOpt = False,
) -> None:
    """Give a researcher a new generated password, shown once; the old one stops working."""
    live(site)
    from datasites.serving import admin

    password = admin.reset_password(site, email)
    if json:
        emit_json({"email": email, "password": password})
    else:
        out.print(f"new password for {email} (shown once): {password}")


@users_app.command("list")
def users_list(site: SiteOpt, json: JsonOpt = False) -> None:
    """Accounts on this datasite."""
    live(site)
    from datasites.serving import admin

    rows = admin.list_users(admin.admin_client(site))
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
    data = {n: store.get(n).to_dict() for n in names}
    if json:
        emit_json(data)
    else:
        for name, policy in data.items():
            table(f"policy: {name}", ["field", "value"], [[k, v] for k, v in policy.items()])


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
) -> None:
    """Change a dataset's policy; unnamed fields keep their current value."""
    from dataclasses import replace

    from datasites.review.access import PolicyStore

    _known_dataset(site, dataset)
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
    store.set(dataset, replace(current, **changes))
    out.print(f"policy of {dataset} updated")


@app.command()
def requests(site: SiteOpt, json: JsonOpt = False) -> None:
    """Submitted jobs with their automatic policy report."""
    from datasites.review.queue import ReviewQueue

    live(site)
    items = ReviewQueue(site).items()
    if json:
        emit_json([i.to_dict() for i in items])
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
                i.request_id[:8],
                i.job_name,
                i.submitted,
                i.researcher,
                i.state,
                i.report.job.dataset if i.report.job else "",
                "pass" if i.report.passed else "FAIL",
                ", ".join(c.name for c in i.report.failures()),
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

    from datasites.review.queue import ReviewQueue

    live(site)
    item = ReviewQueue(site).find(request_id)
    if json:
        emit_json({**item.to_dict(), "code": item.raw_code})
        return
    out.print(Syntax(item.raw_code[:4000], "python", word_wrap=True))
    if item.report.job:
        arch = item.report.job.architecture
        table(
            f"model: {arch.n_parameters} trainable parameters, input {list(arch.input)}",
            ["layer", "type", "output shape", "parameters"],
            [[r["layer"], r["type"], str(r["output"]), str(r["params"])] for r in arch.table()],
        )
        table("plan (what each round runs here)", ["field", "value"], _plan_rows(item.report.job))
    print_report(item)


def _plan_rows(job) -> list[list[str]]:  # noqa: ANN001
    """The plan's fields, with the algorithms spelled out for the reviewer."""
    plan = job.plan
    rows = [[k, str(v)] for k, v in plan.to_dict().items()]
    notes = []
    if plan.proximal_mu:
        notes.append(
            f"FedProx: pull of {plan.proximal_mu:g} toward the global weights, after noise"
        )
    if plan.frozen:
        notes.append(
            f"frozen, pinned by digest {str(job.frozen_digest)[:12]}: {', '.join(job.frozen_names)}"
        )
    if plan.compression != "none":
        notes.append(f"updates leave compressed ({plan.compression}); post-processing, no epsilon")
    if plan.class_weight is not None or plan.pos_weight is not None:
        kind = "class_weight" if plan.class_weight is not None else "pos_weight"
        value = plan.class_weight if plan.class_weight is not None else plan.pos_weight
        source = (
            "from this dataset's published DP class counts"
            if value == "balanced"
            else "numbers the researcher chose"
        )
        notes.append(
            f"{kind} {value} ({source}): scales each row's loss before clipping; no epsilon"
        )
    if plan.binary_metrics:
        notes.append(
            "each round a noised score histogram per class (validation rows) -> recall, "
            "precision, ROC-AUC, PR-AUC; charged as 'scores' at the metric noise"
        )
    if plan.personalizes:
        notes.append(
            f"after round {plan.rounds}: {plan.personalize_epochs} epoch(s) fine-tuning "
            f"{', '.join(plan.personalize_layers)}; the model stays here, its DP metrics leave"
        )
    return rows + [["algorithm", n] for n in notes]


def print_report(item) -> None:  # noqa: ANN001
    verdict = "[green]PASSED[/green]" if item.report.passed else "[red]FAILED[/red]"
    table(
        f"policy report for {item.request_id[:8]} from {item.researcher}: {verdict}",
        ["check", "result", "reason"],
        [[c.name, "ok" if c.passed else "FAIL", c.reason] for c in item.report.checks],
    )


@app.command()
def approve(
    site: SiteOpt,
    request_id: Annotated[str, typer.Argument(help="Request id (prefix).")],
    override: Annotated[bool, typer.Option(help="Approve although the report fails.")] = False,
    reason: Annotated[str, typer.Option(help="Why (required with --override).")] = "",
) -> None:
    """Approve a request whose policy report passes (or override, with a recorded reason)."""
    from datasites.review.queue import ReviewQueue

    if override and not reason.strip():
        raise DatasiteError("--override needs --reason TEXT, which is recorded")
    live(site)
    item = ReviewQueue(site).approve(request_id, override=override, reason=reason)
    print_report(item)
    out.print(f"approved {item.request_id[:8]} from {item.researcher}")


@app.command()
def deny(
    site: SiteOpt,
    request_id: Annotated[str, typer.Argument(help="Request id (prefix).")],
    reason: Annotated[str, typer.Option(help="Shown to the researcher.")] = "",
) -> None:
    """Deny a request with a reason the researcher will see."""
    from datasites.review.queue import ReviewQueue

    if not reason.strip():
        raise DatasiteError("deny needs --reason TEXT; the researcher sees it")
    live(site)
    item = ReviewQueue(site).deny(request_id, reason)
    out.print(f"denied {item.request_id[:8]} from {item.researcher}")


@app.command()
def audit(site: SiteOpt, json: JsonOpt = False) -> None:
    """The append-only audit log (its hash chain is verified on every read)."""
    from datasites.ledger.audit import AuditLog
    from datasites.ledger.store import SiteStore

    log = AuditLog(SiteStore(site.site_db))
    entries = log.entries()
    if not log.verify():
        raise DatasiteError("the audit log's hash chain is broken: it was edited")
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
) -> None:
    """Serve the admin web console on loopback (log in with the admin password); Ctrl-C stops it."""
    import uvicorn

    from datasites.console.app import create_app

    if not 1 <= port <= 65535:
        raise DatasiteError(f"port {port} is outside 1-65535")
    live(site)
    out.print(f"console of {site.config().name} on http://127.0.0.1:{port} (Ctrl-C stops it)")
    uvicorn.run(
        create_app(site),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        # failed logins are counted per client address: never one a header names
        proxy_headers=False,
    )


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
    from datasites.ledger.budget import BudgetLedger
    from datasites.ledger.store import SiteStore

    site = open_site(str(dir))
    ledger = BudgetLedger(SiteStore(site.site_db))
    rows = [b.to_dict() for b in ledger.all()]
    public = ledger.public_releases()
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
        "privacy budgets",
        ["researcher", "dataset", "epsilon spent", "epsilon total", "delta", "jobs"],
        [
            [
                r["researcher"],
                r["dataset"],
                f"{r['epsilon_spent']:.3f}",
                f"{r['epsilon_total']:.3f}",
                r["delta"],
                r["charges"],
            ]
            for r in rows
        ],
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
    from datasites.ledger.budget import BudgetLedger, check_budget
    from datasites.ledger.store import SiteStore
    from datasites.serving import admin

    _known_dataset(site, dataset)
    check_budget(epsilon, delta)  # before the login: no server needed
    live(site)
    accounts = {u["email"].lower() for u in admin.list_users(admin.admin_client(site))}
    if researcher.lower() not in accounts:
        raise DatasiteError(
            f"no account {researcher} on this datasite; add it first with 'datasite users add'"
        )
    BudgetLedger(SiteStore(site.site_db)).set_budget(researcher, dataset, epsilon, delta)
    out.print(f"budget of {researcher} on {dataset}: epsilon {epsilon}, delta {delta}")


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
