"""The console's pages, on the same service layer as the CLI: ReviewQueue, BudgetLedger, AuditLog.

There is one way to approve: ``ReviewQueue.approve`` / ``deny``, with the CLI's checks and audit
events. Every page needs a login (the site's admin password); every POST needs the session's
CSRF token; responses carry no-store, frame-deny and a same-origin content policy. Templates are
Jinja2 with autoescaping, so submitted code and reasons are shown, never interpreted.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from datasites.console.sessions import BASE_DELAY, Session, Sessions
from datasites.errors import DatasiteError
from datasites.ledger.audit import AuditLog
from datasites.ledger.budget import BudgetLedger, Release
from datasites.ledger.store import SiteStore
from datasites.serving.config import SiteDir
from policies.errors import FedsiteError

if TYPE_CHECKING:  # imported where used: it loads opacus and scipy
    import uvicorn

    from policies.accounting import Mechanism

COOKIE = "fedsite_console"
DEVICE_COOKIE = "fedsite_device"  # a device that has logged in: its own failed-login count
DEVICE_SECONDS = 180 * 24 * 3600
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'",
}


def server(
    site: SiteDir, port: int, login_delay: float = BASE_DELAY, *, own_logging: bool = True
) -> uvicorn.Server:
    """The console as ``datasite console`` serves it: on 127.0.0.1:``port``; ``.run()`` serves
    until Ctrl-C (or, from another thread, until ``should_exit`` is set).

    ``own_logging``: uvicorn's logging set-up for the process (its handlers on the stderr of
    the moment), as the command wants; a program that serves the console from a thread (a
    test, a notebook) keeps its own with False."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    config = uvicorn.Config(
        create_app(site, login_delay),
        host="127.0.0.1",
        port=port,
        log_config=LOGGING_CONFIG if own_logging else None,
        log_level="warning",
        access_log=False,
        # failed logins are counted per client address: never one a header names
        proxy_headers=False,
    )
    return uvicorn.Server(config)


def create_app(site: SiteDir, login_delay: float = BASE_DELAY) -> FastAPI:
    """The console of ``site``; ``login_delay``: seconds of the first wait after the free
    wrong passwords (``datasite.console.sessions``)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    sessions = Sessions(site.admin_password(), login_delay)
    store = SiteStore(site.site_db)

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers.update(HEADERS)
        return response

    def page(request: Request, name: str, session: Session | None, **context: Any) -> HTMLResponse:
        context |= {"site": site.config().name, "csrf": session.csrf if session else ""}
        return TEMPLATES.TemplateResponse(request, name, context)

    def current(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(COOKIE))

    def login_first() -> RedirectResponse:
        return RedirectResponse("/login", status_code=303)

    def queue() -> Any:
        from datasites.review.queue import ReviewQueue

        return ReviewQueue(site)

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> HTMLResponse:
        return page(request, "login.html", None, error="")

    @app.post("/login", response_model=None)
    def login(request: Request, password: str = Form("")) -> Response:
        address = request.client.host if request.client else ""
        device = request.cookies.get(DEVICE_COOKIE)
        attempt = sessions.attempt(password, address, device)
        if attempt.sid is None:
            wait = math.ceil(attempt.retry_after)
            error = (
                f"too many failed logins from here; try again in {wait} s"
                if attempt.throttled
                else "wrong password"
            )
            response: Response = page(request, "login.html", None, error=error)
            response.status_code = 429 if attempt.throttled else 401
            if attempt.throttled:
                response.headers["Retry-After"] = str(wait)
            return response
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, attempt.sid, httponly=True, samesite="strict", path="/")
        if sessions.client_key(address, device).startswith("address:"):
            response.set_cookie(
                DEVICE_COOKIE,
                sessions.new_device(),
                max_age=DEVICE_SECONDS,
                httponly=True,
                samesite="strict",
                path="/login",
            )
        return response

    @app.post("/logout", response_model=None)
    def logout(request: Request, csrf: str = Form("")) -> Response:
        session = current(request)
        if session is None:
            return login_first()
        if not Sessions.csrf_ok(session, csrf):
            return Response("missing or wrong CSRF token", status_code=403)
        sessions.logout(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/", response_model=None)
    def index(request: Request) -> Response:
        session = current(request)
        if session is None:
            return login_first()
        return page(request, "queue.html", session, items=queue().items())

    @app.get("/requests/{request_id}", response_model=None)
    def request_page(request: Request, request_id: str, message: str = "") -> Response:
        session = current(request)
        if session is None:
            return login_first()
        try:
            item = queue().find(request_id)
        except FedsiteError as exc:
            return page(request, "error.html", session, error=str(exc))
        return page(
            request,
            "request.html",
            session,
            item=item,
            plan=item.report.job.plan.to_dict() if item.report.job else {},
            epsilon=_epsilon(site, item),
            message=message,
        )

    @app.post("/requests/{request_id}/decide", response_model=None)
    def decide(  # noqa: PLR0913
        request: Request,
        request_id: str,
        action: str = Form(""),
        reason: str = Form(""),
        override: str = Form(""),
        csrf: str = Form(""),
    ) -> Response:
        session = current(request)
        if session is None:
            return login_first()
        if not Sessions.csrf_ok(session, csrf):
            return Response("missing or wrong CSRF token", status_code=403)
        try:
            if action == "approve":
                item = queue().approve(request_id, override=bool(override), reason=reason)
            elif action == "deny":
                item = queue().deny(request_id, reason)
            else:
                raise DatasiteError(f"unknown action {action!r}")
        except FedsiteError as exc:
            response = page(request, "error.html", session, error=str(exc), back=request_id)
            response.status_code = 400
            return response
        return RedirectResponse(f"/requests/{item.request_id}?message={action}d", status_code=303)

    @app.get("/budget", response_model=None)
    def budget(request: Request) -> Response:
        session = current(request)
        if session is None:
            return login_first()
        ledger = BudgetLedger(store)
        return page(
            request,
            "budget.html",
            session,
            budgets=ledger.all(),
            public=ledger.public_releases(),
        )

    @app.get("/audit", response_model=None)
    def audit(request: Request) -> Response:
        session = current(request)
        if session is None:
            return login_first()
        log = AuditLog(store, site.root)
        return page(request, "audit.html", session, entries=log.entries(), intact=log.verify())

    @app.get("/epsilon.png", response_model=None)
    def epsilon_plot(request: Request) -> Response:
        if current(request) is None:
            return login_first()
        return Response(_epsilon_png(BudgetLedger(store)), media_type="image/png")

    return app


def _epsilon(site: SiteDir, item: Any) -> float | None:
    """The whole plan's epsilon on this site's published row count, as the runtime will charge."""
    if item.report.job is None:
        return None
    from policies.privacy import job_privacy

    meta = site.datasets_meta().get(item.report.job.dataset, {})
    rows = meta.get("rows")
    try:
        return job_privacy(item.report.job, int(rows)).epsilon_job if rows else None
    except FedsiteError:
        return None


MAX_POINTS = 60  # composed epsilon is recomputed for each prefix of charges: keep it bounded


def _epsilon_png(ledger: BudgetLedger) -> bytes:
    """Epsilon spent over time per (researcher, dataset): the ledger's composition after each
    charge, with each budget as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime

    import matplotlib.pyplot as plt

    from policies.accounting import epsilon

    fig, ax = plt.subplots(figsize=(8, 4))
    for budget in ledger.all():
        own = [r for r in budget.releases if not r["public"]][-MAX_POINTS:]
        public = [r for r in budget.releases if r["public"]]
        times, spent = [], []
        for i, release in enumerate(own):
            mechanisms = [_mechanism(r) for r in public + own[: i + 1]]
            times.append(datetime.fromisoformat(str(release["at"]).replace("Z", "+00:00")))
            spent.append(epsilon(mechanisms, budget.delta, ledger.accountant))
        if times:
            line = ax.step(
                times, spent, where="post", label=f"{budget.researcher} / {budget.dataset}"
            )
            ax.axhline(budget.epsilon_total, linestyle="--", color=line[0].get_color(), alpha=0.6)
    ax.set_title("epsilon spent over time (dashed: budgets; the public mock counts for everyone)")
    ax.set_ylabel("epsilon (composed)")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    if ax.lines:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _mechanism(release: Release) -> Mechanism:
    from policies.accounting import Mechanism

    return Mechanism.from_listing(release["mechanism"])
