"""``researcher``: explore mock data, dry-run, submit and follow federated DP jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from policies.console import emit_json, err, out, run_cli, table
from policies.errors import FedsiteError

app = typer.Typer(
    help="Train models across datasites without seeing their data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # rich tracebacks print local variables, and secrets
)


def _checked_federation(path: Path | None) -> Path | None:
    """The federation file is read while the arguments are parsed, before any command imports
    syft (seconds): a missing or broken file is one line at once."""
    if path is not None:
        from researcher.federation import Federation

        Federation.load(path)
    return path


FedOpt = Annotated[
    Path,
    typer.Option("--federation", "-f", help="Federation TOML file.", callback=_checked_federation),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
TargetOpt = Annotated[
    str | None, typer.Option(help="Label column (default: the one the sites publish).")
]
AutoOpt = Annotated[
    bool,
    typer.Option(
        "--auto-plan",
        help="Take batch size, epochs, rounds, learning rate and clip from 'researcher plan' "
        "(public numbers, no epsilon), replacing the job file's.",
    ),
]
InitOpt = Annotated[
    Path | None,
    typer.Option(
        "--init-weights",
        help="Start from these weights (.npz or a run dir): transfer learning; needed by frozen layers.",
    ),
]


def _checked_inputs(job: Path, init_weights: Path | None):  # noqa: ANN202
    """JOB.py's literals and the initial weights are read before syft is imported (seconds):
    a missing or broken file is one line at once. Returns the initial weights, or None."""
    from researcher.job import load_initial, read_job_file

    read_job_file(job)
    return load_initial(init_weights) if init_weights else None


def _fed(path: Path):  # noqa: ANN202
    from researcher.federation import Federation

    return Federation.load(path)


@app.command()
def datasets(federation: FedOpt, json: JsonOpt = False) -> None:
    """Every site's datasets: schema, row count, mock preview. A site that cannot be listed
    (down, a wrong TLS certificate, a refused login) is one line, and the exit code is 1."""
    from researcher import agent
    from researcher.errors import SiteError

    data = agent.ask(federation, "datasets") if agent.enabled() else None
    if data is None:  # no agent may serve here: this process logs in itself
        from researcher import api

        data = api.datasets(_fed(federation))
    if all(isinstance(v, dict) for v in data.values()):
        raise SiteError("; ".join(v["error"] for v in data.values()) or "no sites")
    if json:
        emit_json(data)
        if any(isinstance(v, dict) for v in data.values()):
            raise typer.Exit(1)
        return
    failed = False
    for site, rows in data.items():
        if isinstance(rows, dict):  # unreachable: one line, the other sites still list
            why = (
                rows["error"]
                if rows["error"].startswith(f"{site}:")
                else f"{site}: {rows['error']}"
            )
            err.print(why, highlight=False, soft_wrap=True)
            failed = True
            continue
        table(
            f"{site}",
            ["dataset", "rows (DP)", "target", "columns", "mock ε", "mock preview (first row)"],
            [
                [
                    d["name"],
                    d["rows"],
                    d["target"],
                    len(d["schema"] or []),
                    d.get("mock_epsilon") or "-",
                    _preview(d),
                ]
                for d in rows
            ],
        )
        for d in rows:
            if d.get("categories"):
                out.print(f"{d['name']} categories (public): {_categories(d)}", highlight=False)
            if d.get("classes"):
                listed = "|".join(map(str, d["classes"]))
                out.print(f"{d['name']} classes (public): {listed}", highlight=False)
            if d.get("bounds"):
                out.print(f"{d['name']} column ranges: {_bounds(d)}", highlight=False)
    out.print(
        "Row counts and mocks are differentially private (each site's ledger charges the mock "
        "to every researcher); column names, dtypes, class labels and the category lists of "
        "categorical columns are disclosed as schema, without noise.",
        style="dim",
    )
    if failed:
        raise typer.Exit(1)


def _categories(dataset: dict) -> str:
    """Each categorical column with its published categories, e.g. "region: east|north"."""
    listed = dataset.get("categories") or {}
    return "; ".join(f"{col}: {'|'.join(map(str, cats))}" for col, cats in listed.items())


def _bounds(dataset: dict) -> str:
    """Each numeric column's range and where it came from: "age [18, 99] declared"; a range
    the DP release found is "dp", one no decade of it stood clear for is "weak"."""
    source = dataset.get("bounds_source") or {}
    return "; ".join(
        f"{col} [{lo:g}, {hi:g}] {source.get(col, 'dp')}"
        for col, (lo, hi) in (dataset.get("bounds") or {}).items()
    )


def _preview(dataset: dict) -> str:
    """The mock's first row as "col=value" pairs, cut between pairs, never inside one."""
    rows = dataset.get("mock_preview") or []
    if not rows:
        return ""
    pairs = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[0].items()]
    shown: list[str] = []
    width = 0
    for pair in pairs:
        if width + len(pair) > 70:
            return ", ".join(shown) + f", ... ({len(pairs) - len(shown)} more)"
        shown.append(pair)
        width += len(pair) + 2
    return ", ".join(shown)


@app.command("try")
def try_job(
    job: Annotated[Path, typer.Argument(help="JOB.py")],
    federation: FedOpt,
    target: TargetOpt = None,
    init_weights: InitOpt = None,
    auto_plan: AutoOpt = False,
    json: JsonOpt = False,
) -> None:
    """Run the job locally on mock data through the site runtime, before submitting."""
    _checked_inputs(job, init_weights)
    from researcher import api

    fed = _fed(federation)
    ready = api.prepare(fed, job, target, init_weights, auto_plan)
    result = api.dry_run(fed, ready)
    summary = {
        k: result[k]
        for k in ("metrics", "privacy", "shapes", "epsilon_per_site", "mock_site", "n", "warnings")
    }
    summary["auto_plan"] = ready.auto.to_dict() if ready.auto else None
    summary["strategy"] = ready.strategy
    if json:
        emit_json(summary)
        return
    if ready.auto:
        _show_plan(ready.auto, f"plan filled by the auto-plan for {ready.spec.dataset}")
    table(
        f"dry run on {result['mock_site']}'s mock ({result['n']} training rows)",
        ["what", "value"],
        [
            *[[f"shape {k}", v] for k, v in result["shapes"].items()],
            *[[k, f"{v:.4g}"] for k, v in result["metrics"].items()],
            ["noise multiplier", f"{result['privacy']['noise_multiplier']:.4g}"],
            *[[f"epsilon at {s}", f"{e:.3f}"] for s, e in result["epsilon_per_site"].items()],
            ["strategy (yours, at train)", _strategy_text(ready.strategy)],
        ],
    )
    _show_warnings(result["warnings"])


@app.command()
def submit(
    job: Annotated[Path, typer.Argument(help="JOB.py")],
    federation: FedOpt,
    target: TargetOpt = None,
    init_weights: InitOpt = None,
    auto_plan: AutoOpt = False,
    json: JsonOpt = False,
) -> None:
    """Submit the job to every site of the federation for review."""
    _checked_inputs(job, init_weights)
    from researcher import api

    fed = _fed(federation)
    ready = api.prepare(fed, job, target, init_weights, auto_plan)
    if ready.auto and not json:
        _show_plan(ready.auto, f"plan filled by the auto-plan for {ready.spec.dataset}")
    requests = api.submit(fed, ready)
    warnings = [w.to_dict() for w in ready.warnings]
    if json:
        emit_json(
            {
                "job": ready.spec.name,
                "requests": requests,
                "plan": ready.spec.plan.to_dict(),
                "auto_plan": ready.auto.to_dict() if ready.auto else None,
                "strategy": ready.strategy,
                "warnings": warnings,
            }
        )
        return
    _show_warnings(warnings)
    out.print(
        f"submitted {ready.spec.name} to {', '.join(requests)}; follow it with 'researcher status'"
    )


def _strategy_text(config: dict | None) -> str:
    """``fedavgm (server_lr=0.5, momentum=0.5)``: the strategy's name and its parameters."""
    if not config:
        return "fedavg"
    params = ", ".join(f"{k}={v:g}" for k, v in config.items() if k != "name")
    return f"{config['name']} ({params})" if params else str(config["name"])


@app.command()
def plan(
    federation: FedOpt,
    epsilon: Annotated[float, typer.Option("--epsilon", help="Target epsilon per site.")],
    dataset: Annotated[
        str | None, typer.Option(help="Dataset (default: the one every site publishes).")
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Suggest a DP-SGD plan from the sites' public numbers (rows, classes); spends no epsilon."""
    from researcher.errors import JobError

    if not 0 < epsilon < float("inf"):  # refused before syft's import (seconds)
        raise JobError(f"--epsilon must be a positive finite number, got {epsilon:g}")
    from researcher import api

    fed = _fed(federation)
    name = dataset or api.only_dataset(api.datasets(fed))
    auto, warnings = api.plan_for(fed, name, epsilon)
    if json:
        emit_json({"dataset": name, **auto.to_dict(), "warnings": [w.to_dict() for w in warnings]})
        return
    _show_plan(auto, f"suggested plan for {name} at epsilon {epsilon:g} per site")
    _show_warnings([w.to_dict() for w in warnings])
    out.print(
        f'Minimal job file: DATASET = "{name}" and PLAN = {{"target_epsilon": {epsilon:g}}} '
        "(the rest is filled as above; no model means one linear layer).",
        style="dim",
        highlight=False,
    )


def _show_plan(auto, title: str) -> None:  # noqa: ANN001
    """The auto-plan's fields with the reason for each, then what each site will spend."""
    table(
        title,
        ["field", "value", "why"],
        [[k, str(auto.fields[k]), why] for k, why in auto.reasons.items()],
    )
    table(
        "at each site (from its published rows)",
        ["site", "noise multiplier", "epsilon", "step noise (sigma/batch)"],
        [
            [s, f"{auto.noise_multiplier[s]:.3g}", f"{auto.epsilon[s]:.3f}", f"{r:.3g}"]
            for s, r in auto.noise_to_signal.items()
        ],
    )


def _show_warnings(warnings: list[dict]) -> None:
    """Each utility warning on its own line, cause then fix (stderr: stdout stays the result)."""
    for w in warnings:
        err.print(f"warning: {w['cause']}: {w['fix']}", highlight=False, soft_wrap=True)


@app.command()
def status(
    federation: FedOpt,
    job: Annotated[
        str | None, typer.Option(help="Job name (default: the latest submitted).")
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Per site: pending, approved, denied (with the admin's reason), running, done, failed."""
    from researcher import agent
    from researcher.jobs import saved_job

    fed = _fed(federation)
    spec = saved_job(fed, job)  # an unknown job is refused before syft is imported
    data = agent.ask(federation, "status", job=spec.name) if agent.enabled() else None
    if data is None:  # no agent may serve here: this process logs in itself
        from researcher import api

        data = api.status(fed, spec)
    if json:
        emit_json({"job": spec.name, "sites": data})
        return
    table(
        f"job {spec.name}",
        ["site", "status", "rounds done", "reason"],
        [
            [site, d["status"], d.get("rounds_done", ""), d.get("reason") or ""]
            for site, d in data.items()
        ],
    )


@app.command()
def train(
    federation: FedOpt,
    run_dir: Annotated[
        Path | None, typer.Option(help="Where checkpoints, metrics and plots go.")
    ] = None,
    job: Annotated[str | None, typer.Option(help="Submitted job (default: latest).")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run checkpointed in this RUN_DIR.")
    ] = None,
    min_sites: Annotated[
        int | None,
        typer.Option(help="Fewest replies a round accepts (default: every site of the job)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a site per round.")] = 300,
    test: Annotated[Path | None, typer.Option(help="CSV of your own test rows.")] = None,
    precision: Annotated[
        float,
        typer.Option(
            help="With --test and a binary model: report the recall reachable at this precision."
        ),
    ] = 0.5,
    target: TargetOpt = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="Override the job file's STRATEGY (default fedavg) with fedavg, fedavgm, "
            "fedadam, fedyogi, median, trimmed-mean or norm-bounded, at its default parameters "
            "(researcher-side post-processing; no extra epsilon)."
        ),
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Run the federated rounds of an approved job: progress, checkpoints, metrics, plots.

    Every round waits for every site unless --min-sites says less. The run ends with a
    per-site summary. Exit code: 0 when every site took every round; 3 when the run finished
    but a site missed rounds (the summary says which and why); 1 on an error.
    """
    from rich.progress import Progress

    from researcher.errors import JobError
    from researcher.jobs import check_run_dir
    from researcher.strategy import strategy_config, strategy_named

    aggregator = strategy_named(strategy) if strategy else None  # a typo: refused at once
    if not 0.0 < precision <= 1.0:
        raise JobError(f"--precision must be in (0, 1], got {precision}")
    if (run_dir is None) == (resume is None):
        raise JobError("give exactly one of --run-dir DIR (new run) or --resume RUN_DIR")
    run_dir = run_dir or resume
    assert run_dir is not None  # exactly one of the two, checked above
    if test is not None and not test.is_file():
        raise JobError(f"test file {test} not found")
    check_run_dir(run_dir, resume is not None)  # before syft is imported or a site contacted
    from researcher import api  # syft: only once every argument was checked

    done = api.run_finished(resume) if resume is not None else 0
    if done:
        if json:
            emit_json({"run_dir": str(resume), "rounds": done, "finished": True})
        else:
            out.print(f"{resume}: this run already finished all {done} rounds; nothing to do")
        return
    fed = _fed(federation)
    spec = api.saved_job(fed, job)
    test_xy = (
        api.read_test_rows(test, target or spec.target, spec.layout, spec.classes) if test else None
    )
    aggregator = api.strategy_for(fed, spec, run_dir, resume is not None, aggregator)
    if not json:
        out.print(f"strategy: {_strategy_text(strategy_config(aggregator))}", highlight=False)
    with Progress(disable=json) as progress:
        bar = progress.add_task("rounds", total=spec.plan.rounds)

        def on_round(rec) -> None:  # noqa: ANN001
            progress.update(bar, completed=rec.round)
            if not json:
                skipped = f"; skipped {', '.join(rec.skipped)}" if rec.skipped else ""
                progress.console.print(
                    f"round {rec.round}: {_round_sites(rec.updates)}"
                    + (f"; test {rec.test_accuracy:.3f}" if rec.test_accuracy is not None else "")
                    + _ranking(rec.test_metrics)
                    + skipped
                )

        try:
            result = api.train(
                fed,
                spec,
                run_dir,
                resume=resume is not None,
                min_sites=min_sites,
                timeout_s=timeout,
                test=test_xy,
                test_precision=precision,
                on_round=on_round,
                strategy=aggregator,
            )
        except KeyboardInterrupt:
            err.print(
                f"interrupted; the last finished round is saved in {run_dir}. Continue with: "
                f"researcher train -f {federation} --resume {run_dir}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(130) from None
    summary = {
        "run_dir": str(run_dir),
        "rounds": len(result.rounds),
        "test_accuracy": result.rounds[-1].get("test_accuracy") if result.rounds else None,
        "test_metrics": result.rounds[-1].get("test_metrics") if result.rounds else None,
    }
    summary["sites"] = result.sites
    summary["complete"] = result.complete
    summary["strategy"] = strategy_config(aggregator)
    if json:
        emit_json(summary)
    else:
        _site_table(result.sites)
        out.print(f"done: {summary['rounds']} rounds; model, metrics.csv and plots in {run_dir}")
    if not result.complete:
        missed = [n for n, s in result.sites.items() if s["rounds_missed"]]
        err.print(f"warning: {', '.join(missed)} missed rounds (see the summary); exit code 3")
        raise typer.Exit(3)


def _round_sites(updates: list) -> str:
    """The sites that sent an update; their DP validation accuracy only where the plan asked
    the sites for metrics (otherwise there is none to show, and the line says so)."""
    if any("val_accuracy" in u.metrics for u in updates):
        return "DP val accuracy " + ", ".join(
            f"{u.site} {u.metrics['val_accuracy']:.3f}" if "val_accuracy" in u.metrics else u.site
            for u in updates
        )
    return f"updates from {', '.join(u.site for u in updates)} (no site metrics in this plan)"


def _site_table(sites: dict) -> None:
    table(
        "per site",
        ["site", "rounds taken", "rounds missed", "why missed", "epsilon spent"],
        [
            [
                name,
                s["rounds_taken"],
                s["rounds_missed"],
                "; ".join(f"{why} (x{n})" for why, n in s["missed_because"].items()),
                "" if s["epsilon_spent"] is None else f"{s['epsilon_spent']:.3f}",
            ]
            for name, s in sites.items()
        ],
    )


def _ranking(metrics: dict) -> str:
    """ROC-AUC, PR-AUC, balanced accuracy and recall at the precision, when the model is binary."""
    if "roc_auc" not in metrics:
        return ""
    return (
        f", ROC-AUC {metrics['roc_auc']:.3f}, PR-AUC {metrics['pr_auc']:.3f}, balanced "
        f"{metrics['balanced_accuracy']:.3f}, recall {metrics['recall_at_precision']:.3f} at "
        f"precision {metrics['precision_target']:g}"
    )


def main() -> None:
    import logging

    # urllib3 logs each retry of a refused TLS handshake as a WARNING: the refusal is our one line
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    run_cli(app, (FedsiteError,))


if __name__ == "__main__":
    main()
