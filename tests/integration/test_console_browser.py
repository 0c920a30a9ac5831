"""The admin console in a real browser: Debian's headless Chromium, driven by Selenium, in front
of the console as ``datasite console`` serves it (from a thread of the test: ``console_on``)
and a real datasite with a researcher's pending submissions.

An admin logs in by keyboard, opens a pending request, approves it with a click; the syft
request is then approved for the researcher and the audit log has it. A POST whose CSRF token is
missing or forged changes nothing. Each page passes the accessibility basics (a label for every
field, keyboard reach, a visible focus ring, WCAG AA text contrast), and its screenshot is saved
under the test's temp dir (and in ``FEDSITE_SCREENSHOTS_DIR`` when set: how the README's
``docs/console-request.png`` is made).

The browser comes from ``scripts/setup`` (``apt-get install chromium chromium-driver``). Where it
is missing the tests skip, saying why; under CI (``CI`` set) they fail instead.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from researcher import api
from tests.conftest import console_on, last_json
from tests.integration.conftest import EMAIL, job

pytestmark = pytest.mark.integration

SITE_NAMES = ("hospital-a",)  # the federation fixture's sites
CHROMIUM = os.environ.get("FEDSITE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (
    os.environ.get("FEDSITE_CHROMEDRIVER")
    or shutil.which("chromedriver")
    or "/usr/bin/chromedriver"
)
PLAN = {"rounds": 1, "noise_multiplier": 1.5, "batch_size": 64}
WIDTH = 1200


def _no_browser(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser tests: scripts/setup installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (about a second to start)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        _no_browser(
            f"no {' or '.join(missing)}: Debian's chromium and chromium-driver are not installed "
            "(scripts/setup installs them where apt-get runs as root)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _no_browser("selenium is not installed: run scripts/setup (the project's dev extras)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WIDTH},900")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def console(federation, tmp_path_factory):
    """The one site with two pending submissions from the researcher, its budget set, and its
    console as ``datasite console`` serves it, on a loopback port."""
    fed, (site,) = federation
    site.cli("budget", "set", "--researcher", EMAIL, "--dataset", "cancer", "--epsilon", "8")
    to_approve, to_forge = job(dict(PLAN)), job(dict(PLAN, rounds=2))
    for spec in (to_approve, to_forge):
        api.submit(fed, spec, dry=False)
    with console_on(site.dir) as url:
        yield {
            "fed": fed,
            "site": site,
            "url": url,
            "approve": to_approve,
            "forge": to_forge,
            "shots": tmp_path_factory.mktemp("screenshots"),
        }


# --- what the browser is asked -------------------------------------------------------------

# Contrast by WCAG 2.x: relative luminance of sRGB colours; a text's background is the first
# opaque background at or above it (the page's is white). Returns each failing text.
CONTRAST_JS = """
function rgb(s) { const m = s.match(/[\\d.]+/g).map(Number); return {r: m[0], g: m[1], b: m[2], a: m.length > 3 ? m[3] : 1}; }
function lum(c) { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
  return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b); }
function ratio(a, b) { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); }
function background(el) { for (let e = el; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor); if (c.a > 0.5) return c; } return {r: 255, g: 255, b: 255, a: 1}; }
window.fedsiteContrast = {rgb, ratio, background};
const bad = [];
for (const el of document.body.querySelectorAll('*')) {
  const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
  const style = getComputedStyle(el);
  if (!own || style.visibility === 'hidden' || style.display === 'none' || el.getClientRects().length === 0) continue;
  const r = ratio(rgb(style.color), background(el));
  if (r < 4.5) bad.push(`${el.tagName.toLowerCase()} "${el.textContent.trim().slice(0, 30)}": ${r.toFixed(2)}`);
}
return bad;
"""

# Every field a person fills in has a label (or an ARIA name); every button says what it does.
UNLABELLED_JS = """
const bad = [];
for (const el of document.querySelectorAll('input, textarea, select')) {
  if (el.type === 'hidden') continue;
  const named = el.labels.length > 0 && [...el.labels].some(l => l.textContent.trim())
    || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby');
  if (!named) bad.push(el.outerHTML.slice(0, 80));
}
for (const el of document.querySelectorAll('button')) if (!el.textContent.trim()) bad.push(el.outerHTML.slice(0, 80));
return bad;
"""

# The focused element's ring: its outline style, width (px), and its contrast with what it is
# drawn on (the elements under the ring's four sides, which may not be the element's parent).
FOCUS_RING_JS = """
const el = document.activeElement, s = getComputedStyle(el), c = window.fedsiteContrast;
if (s.outlineStyle === 'none') return {style: 'none', width: 0, contrast: 0};
const box = el.getBoundingClientRect(), out = parseFloat(s.outlineOffset) + parseFloat(s.outlineWidth) / 2;
const ys = (box.top + box.bottom) / 2, xs = (box.left + box.right) / 2;
const points = [[box.left - out, ys], [box.right + out, ys], [xs, box.top - out], [xs, box.bottom + out]];
let worst = Infinity;
for (const [x, y] of points) {
  const under = document.elementsFromPoint(Math.max(x, 0), Math.max(y, 0)).find(e => e !== el && !el.contains(e));
  worst = Math.min(worst, c.ratio(c.rgb(s.outlineColor), c.background(under || document.body)));
}
return {style: s.outlineStyle, width: parseFloat(s.outlineWidth), contrast: worst};
"""


# Focus on the page itself, as before anything was focused: the next Tab goes to the first stop
# (the body is made focusable for that one call: blur() would leave Chromium's starting point
# at the element it blurred).
TOP_OF_PAGE_JS = """
document.body.tabIndex = -1;
document.body.focus();
document.body.removeAttribute('tabindex');
"""


def _tab_stops(driver, n: int) -> list[dict]:
    """The elements the Tab key reaches from the top of the page (the first ``n``), with their
    focus ring as the browser draws it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver.execute_script(CONTRAST_JS)  # defines the colour helpers
    driver.execute_script(TOP_OF_PAGE_JS)
    stops = []
    for _ in range(n):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        el = driver.switch_to.active_element
        if el.tag_name == "body":  # past the last stop: the browser's own controls are next
            break
        stops.append(
            {
                "id": el.get_attribute("id") or "",
                "tag": el.tag_name,
                "text": el.text.strip()[:40],
                "type": el.get_attribute("type") or "",
                **driver.execute_script(FOCUS_RING_JS),
            }
        )
    return stops


def _accessible(driver) -> None:
    """The accessibility basics, on the page the browser shows."""
    assert driver.execute_script(UNLABELLED_JS) == []
    assert driver.execute_script(CONTRAST_JS) == []
    assert driver.execute_script("return document.documentElement.lang") == "en"
    assert driver.find_elements("css selector", "main h1")


def _screenshot(console: dict, driver, name: str) -> Path:
    """The whole page, beyond the window (Chromium's DevTools capture), under the test's temp
    dir, and in ``FEDSITE_SCREENSHOTS_DIR`` as ``console-NAME.png`` when that is set."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path = console["shots"] / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5_000
    if out := os.environ.get("FEDSITE_SCREENSHOTS_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(out) / f"console-{name}.png")
    return path


def _login_by_keyboard(driver, console: dict) -> None:
    """Log in as a keyboard user does: Tab to the password field, type, Tab to the button,
    press Enter."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver.get(f"{console['url']}/login")
    driver.execute_script(TOP_OF_PAGE_JS)
    for _ in range(6):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        if driver.switch_to.active_element.get_attribute("id") == "password":
            break
    else:
        raise AssertionError("Tab never reaches the password field")
    ActionChains(driver).send_keys(console["site"].password, Keys.TAB, Keys.ENTER).perform()
    _wait_for(driver, lambda d: d.current_url.rstrip("/") == console["url"])


def _wait_for(driver, ready, timeout: float = 90.0):
    """Generous: an approval (a syft call) on a loaded two-core machine has taken over 20 s."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(ready)


def _open_request(driver, console: dict, job_name: str) -> str:
    """From the queue, follow the link in the job's row; the request id it opens."""
    driver.get(console["url"] + "/")
    row = driver.find_element(
        "xpath", f"//tr[td[normalize-space()='{job_name}']]//a[starts-with(@href, '/requests/')]"
    )
    row.click()
    _wait_for(driver, lambda d: "/requests/" in d.current_url)
    return driver.current_url.rsplit("/requests/", 1)[1].split("?")[0]


# --- the tests ------------------------------------------------------------------------------


def test_the_login_page_is_reached_and_used_by_keyboard(browser, console) -> None:
    browser.delete_all_cookies()
    browser.get(console["url"] + "/")
    assert browser.current_url.endswith("/login")  # no page without a login
    _accessible(browser)
    _screenshot(console, browser, "login")
    stops = _tab_stops(browser, 3)
    order = [s["id"] or s["text"] for s in stops]
    assert order == ["Skip to content", "password", "Log in"], stops  # the field, its button
    # a ring a sighted keyboard user can see, on the page and on the header
    assert [s for s in stops if s["style"] == "none" or s["width"] < 2 or s["contrast"] < 3] == []
    # a wrong password is said in words, next to the field
    field = browser.find_element("id", "password")
    field.send_keys("not the password")
    browser.find_element("css selector", "form button[type=submit]").click()
    _wait_for(browser, lambda d: d.find_elements("css selector", "[role=alert]"))
    assert "wrong password" in browser.find_element("css selector", "[role=alert]").text
    _accessible(browser)  # the error box too


def test_an_admin_approves_a_pending_request_in_the_browser(browser, console) -> None:
    fed, site, spec = console["fed"], console["site"], console["approve"]
    assert api.status(fed, spec)["hospital-a"]["status"] == "pending"
    browser.delete_all_cookies()
    _login_by_keyboard(browser, console)
    assert browser.find_element("tag name", "h1").text == "Review queue"
    assert spec.name in browser.find_element("tag name", "table").text
    _accessible(browser)
    _screenshot(console, browser, "queue")

    rid = _open_request(browser, console, spec.name)
    body = browser.find_element("tag name", "main").text
    assert f"{spec.name}" in body and "status pending" in body
    assert "Linear" in body and "Estimated epsilon" in body and "Policy report: passed" in body
    _accessible(browser)
    # the request's own controls are keyboard reachable, after the header's
    stops = _tab_stops(browser, 12)
    reached = [s["id"] for s in stops]
    assert {"approve", "deny-reason", "deny"} <= set(reached), reached
    unseen = [s for s in stops if s["style"] == "none" or s["width"] < 2 or s["contrast"] < 3]
    assert unseen == []
    assert reached.index("approve") < reached.index("deny-reason") < reached.index("deny")
    _screenshot(console, browser, "request")

    browser.find_element("id", "approve").click()
    _wait_for(browser, lambda d: "message=approved" in d.current_url)
    assert browser.find_element("css selector", "[role=status]").text == "approved"
    assert "status approved" in browser.find_element("tag name", "main").text
    assert not browser.find_elements("id", "approve")  # nothing left to decide
    # what the researcher sees through syft, and what the site's audit log holds
    assert api.status(fed, spec)["hospital-a"]["status"] == "approved"
    entries = last_json(site.cli("audit", "--json"))
    assert [e for e in entries if e["event"] == "approved" and e["request_id"] == rid]

    browser.find_element("link text", "Budget").click()
    _wait_for(browser, lambda d: d.current_url.endswith("/budget"))
    budget = browser.find_element("tag name", "table").text
    assert EMAIL in budget and "8.000" in budget
    plot = browser.find_element("css selector", "main img")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", plot)
    _accessible(browser)
    _screenshot(console, browser, "budget")

    browser.find_element("link text", "Audit log").click()
    _wait_for(browser, lambda d: d.current_url.endswith("/audit"))
    assert "Hash chain verified" in browser.find_element("css selector", "[role=status]").text
    rows = [r.text for r in browser.find_elements("css selector", "tbody tr")]
    assert any(" approved " in f" {r} " and rid[:8] in r for r in rows), rows
    _accessible(browser)
    _screenshot(console, browser, "audit")


def test_a_post_without_the_csrf_token_is_refused(browser, console) -> None:
    fed, spec = console["fed"], console["forge"]
    browser.delete_all_cookies()
    _login_by_keyboard(browser, console)
    rid = _open_request(browser, console, spec.name)
    # the page's own form, its token removed: the browser sends the session cookie, no token
    browser.execute_script(
        "const f = document.getElementById('approve').form;"
        "f.querySelector('input[name=csrf]').remove(); f.submit();"
    )
    _wait_for(browser, lambda d: "/decide" in d.current_url)
    assert "missing or wrong CSRF token" in browser.find_element("tag name", "body").text
    # a script of the page, posting with another token: refused with 403
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', body: new URLSearchParams("
        "{action: 'approve', csrf: 'x'.repeat(43)})}).then(r => done(r.status));",
        f"/requests/{rid}/decide",
    )
    assert status == 403
    assert api.status(fed, spec)["hospital-a"]["status"] == "pending"
    browser.get(f"{console['url']}/requests/{rid}")
    assert "status pending" in browser.find_element("tag name", "main").text
