"""The dashboard end to end in a real browser: `radai dashboard` started as a process on a copy of
the processed sample study's database (built as in test_dashboard), driven with Selenium through
Debian's headless Chromium: login (no patient data before it), the worklist in priority order,
the study with its SEG overlay toggled, a review that reaches the database, the same decision
read in the audit trail by an auditor, and the monitoring page counting it.

Needs Debian's `chromium` and `chromium-driver`; without them the test is skipped, except under
CI (CI=true), where it fails. Screenshots go to the test's tmp_path and to var/screenshots/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from dashboard import store
from db import AuditEntry, Job, Review, Study
from db.session import Database
from db.users import add_user
from tests.conftest import free_port, wait_for
from tests.integration import test_dashboard
from tests.kit.paths import REPO

try:
    from selenium import webdriver
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        WebDriverException,
    )
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # checked in the browser fixture: skipped outside CI, a failure in CI
    webdriver = None

ROOT = REPO
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = ROOT / "var" / "screenshots"
USER = "dr_browser"
AUDITOR = "audit_browser"
PASSWORD = "browser battery staple"
PATIENT = "DEMO, LUNG1"
NOTE = "solid nodule, seen in the browser"
TIMEOUT = 30

# The processed sample study, built once per module exactly as test_dashboard builds it.
template = test_dashboard.template


@pytest.fixture
def dashboard(template: Path, tmp_path: Path) -> Iterator[tuple[str, Database]]:
    """`python -m radai dashboard` on a private copy of the template database; its URL and db."""
    home = tmp_path / "home"
    home.mkdir()
    path = home / "radai.sqlite"
    shutil.copy(template, path)
    url = f"sqlite:///{path}"
    db = Database(url)
    with db.session() as s:
        add_user(s, USER, "radiologist", PASSWORD, actor="test")
        add_user(s, AUDITOR, "auditor", PASSWORD, actor="test")
    port = free_port()
    env = {
        **os.environ,
        "RADAI_HOME": str(home),
        "RADAI_DATABASE_URL": url,
        "RADAI_SESSION_MINUTES": "30",
    }
    log = (tmp_path / "dashboard.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "radai", "dashboard", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: streamlit runs as a child of radai
    )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the dashboard exited ({proc.returncode}): {_tail(tmp_path)}")
        try:
            with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_for(healthy, timeout=60, interval=0.3)
        yield base, db
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=5)
        log.close()
        db.dispose()


def _tail(tmp_path: Path) -> str:
    path = tmp_path / "dashboard.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if webdriver is None:
        missing.append("the selenium package")
    if missing:
        message = f"{', '.join(missing)} missing (apt-get install chromium chromium-driver; pip)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    # The network log: which URLs the page fetched (test_nothing_leaves_the_session).
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior",
        {"behavior": "allow", "downloadPath": str(tmp_path / "downloads")},
    )
    try:
        yield driver
    finally:
        driver.quit()


# --- page helpers ---------------------------------------------------------------------------


def _until(driver: WebDriver, condition: Callable, what: str, timeout: float = TIMEOUT):
    """Wait for condition(driver); Streamlit redraws elements, so stale ones are retried."""
    wait = WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.2,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )
    return wait.until(condition, message=f"waiting for {what}")


def _idle(driver: WebDriver) -> None:
    """Wait until the script run that the last action started has finished."""
    time.sleep(0.3)
    _until(
        driver,
        lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]'),
        "the app to finish running",
    )


def _body(driver: WebDriver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def _css(driver: WebDriver, selector: str, timeout: float = TIMEOUT) -> WebElement:
    return _until(
        driver,
        lambda d: next(
            (e for e in d.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed()), None
        ),
        selector,
        timeout,
    )


def _click(driver: WebDriver, selector: str, text: str | None = None) -> None:
    """Click the first visible element matching selector (and containing text)."""

    def click(d: WebDriver) -> bool:
        for e in d.find_elements(By.CSS_SELECTOR, selector):
            if e.is_displayed() and (text is None or text in e.text):
                d.execute_script("arguments[0].scrollIntoView({block: 'center'});", e)
                e.click()
                return True
        return False

    _until(driver, click, f"{selector} {text or ''}".strip())


def _image_src(driver: WebDriver) -> str:
    return _css(driver, '[data-testid="stImage"] img').get_attribute("src")


def _grid_rows(driver: WebDriver) -> list[list[str]]:
    """The cells of the first table on the page, row by row, as its accessible table holds them
    (Streamlit draws tables on a canvas; the accessible table lists the rows in view)."""
    return driver.execute_script(
        "const grid = document.querySelector('[data-testid=\"stDataFrame\"] table');"
        "if (!grid) return [];"
        "return Array.from(grid.querySelectorAll('tbody tr')).map("
        "  tr => Array.from(tr.querySelectorAll('td')).map(td => td.textContent));"
    )


def _login(driver: WebDriver, name: str) -> None:
    _css(driver, ".st-key-login_name input").send_keys(name)
    _css(driver, ".st-key-login_password input").send_keys(PASSWORD)
    _click(driver, '[data-testid="stFormSubmitButton"] button', "Log in")


def _pick(driver: WebDriver, key: str, typed: str) -> None:
    """Choose in a selectbox by typing part of the option and Enter."""
    _click(driver, f".st-key-{key} input")
    box = _css(driver, f".st-key-{key} input")
    box.send_keys(typed)
    box.send_keys(Keys.ENTER)


def _pick_lung1(driver) -> None:  # noqa: ANN001
    _pick(driver, "wl_pick", "LUNG1")
    _until(
        driver,
        lambda d: PATIENT in _css(d, ".st-key-wl_pick input").get_attribute("value"),
        "the study picked",
    )


def _shot(driver: WebDriver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot {name}"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOTS / path.name)
    return path


# --- the test -------------------------------------------------------------------------------


def test_login_worklist_study_overlay_and_review_in_a_browser(dashboard, browser, tmp_path):
    (SCREENSHOTS / "failure.png").unlink(missing_ok=True)  # left by an earlier failed run
    try:
        _walk_through(*dashboard, browser, tmp_path)
    except BaseException:
        # What the page showed, for diagnosis (also copied to var/screenshots/).
        _shot(browser, tmp_path, "failure")
        (tmp_path / "failure.html").write_text(browser.page_source)
        raise


def _walk_through(base: str, db: Database, driver: WebDriver, tmp_path: Path) -> None:
    with db.session() as s:
        job = s.execute(select(Job)).scalars().one()
        job_id, lesion = job.id, job.findings["lesions"][0]
        job_model = f"{job.pipeline} {job.pipeline_version}"
    label = lesion["label"]

    # Login page: nothing of a patient before login.
    try:
        driver.get(base + "/")
    except WebDriverException as exc:  # pragma: no cover - diagnostic
        pytest.fail(f"the browser cannot load {base}: {exc}\n{_tail(tmp_path)}")
    # The first page is the app's first script run (its imports, the database's first query):
    # on a machine busy with the rest of the suite that took more than TIMEOUT once.
    _css(driver, ".st-key-login_name input", timeout=3 * TIMEOUT)
    _idle(driver)
    assert "Log in" in _body(driver)
    assert "DEMO" not in driver.page_source and "SYNTH" not in driver.page_source
    _shot(driver, tmp_path, "1-login")

    _login(driver, USER)

    # Worklist: the sample studies in priority order (as the table shows them), then the
    # processed study picked by its patient's name.
    _until(driver, lambda d: "Worklist" in _body(d), "the worklist")
    _css(driver, ".st-key-wl_pick")
    _idle(driver)
    expected = _expected_patients(db)
    rows = _until(
        driver, lambda d: len(_grid_rows(d)) == len(expected) and _grid_rows(d), "the table"
    )
    assert [row[2] for row in rows] == expected  # Priority, State, Patient, ...
    # The picked study's label (with the patient's name) is shown in the combobox.
    _pick_lung1(driver)
    _idle(driver)
    _shot(driver, tmp_path, "2-worklist")

    _click(driver, ".st-key-wl_open button")
    _until(
        driver,
        lambda d: PATIENT in d.find_element(By.CSS_SELECTOR, '[data-testid="stHeading"]').text,
        "the study page",
    )
    src_on = _image_src(driver)
    _idle(driver)
    # Nothing of the study (let alone the patient) travels in the address: it names the page.
    assert urllib.parse.urlsplit(driver.current_url)[2:] == ("/study", "", "")

    # The lesion's SEG overlay off and on again: the picture changes each time.
    lesion_box = '[data-testid="stCheckbox"]'
    _click(driver, lesion_box, f"Lesion {label}")
    _until(driver, lambda d: _image_src(d) != src_on, "the image without the lesion overlay")
    _idle(driver)
    src_off = _image_src(driver)
    _click(driver, lesion_box, f"Lesion {label}")
    _until(driver, lambda d: _image_src(d) != src_off, "the image with the lesion overlay")
    _idle(driver)
    _shot(driver, tmp_path, "3-study-overlay")

    # Review: accept lesion `label` with a note.
    tag = f"{job_id}_{label}_0"
    _click(driver, '[data-testid="stExpander"] summary', f"Lesion {label}:")
    _click(driver, f".st-key-decision_{tag} label", "accept")
    _css(driver, f".st-key-note_{tag} textarea").send_keys(NOTE)
    _click(
        driver,
        '[data-testid="stExpander"] [data-testid="stFormSubmitButton"] button',
        "Save review",
    )
    _until(driver, lambda d: f"Lesion {label}: accept saved." in _body(d), "the review saved")
    _idle(driver)
    _shot(driver, tmp_path, "4-after-review")

    with db.session() as s:
        reviews = list(s.execute(select(Review)).scalars())
        accepted = list(
            s.execute(select(AuditEntry).where(AuditEntry.action == "review.accept")).scalars()
        )
    assert [(r.decision, r.lesion_label, r.job_id, r.note) for r in reviews] == [
        ("accept", label, job_id, NOTE)
    ]
    assert [(e.actor, e.study_uid) for e in accepted] == [(USER, test_dashboard.LUNG1)]
    assert accepted[0].detail["review"] == reviews[0].id

    # The audit trail, as an auditor reads it: the radiologist's decision on this study.
    _click(driver, ".st-key-logout button")
    _css(driver, ".st-key-login_name input")
    _idle(driver)
    assert "DEMO" not in driver.page_source
    _login(driver, AUDITOR)
    _until(driver, lambda d: "Audit trail" in _body(d), "the audit page")
    _idle(driver)
    _pick(driver, "a_actor", USER)
    # Seq, At, Actor, Action, Study UID, ...: once filtered, only the radiologist's entries.
    rows = _until(
        driver,
        lambda d: (rows := _grid_rows(d)) and all(row[2] == USER for row in rows) and rows,
        "the audit trail filtered by user",
    )
    assert [row[3:5] for row in rows if row[3].startswith("review.")] == [
        ["review.accept", test_dashboard.LUNG1]
    ]
    assert {row[3] for row in rows} == {
        "user.login",
        "study.opened",
        "review.accept",
        "user.logout",
    }
    _idle(driver)
    _shot(driver, tmp_path, "5-audit-trail")

    # Monitoring: the review counted for the model that made the finding.
    _click(driver, '[data-testid="stSidebarNav"] a', "Monitoring")
    _until(driver, lambda d: "Reviewed findings" in _body(d), "the monitoring page")
    _until(
        driver,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"]')) >= 3,
        "the monitoring charts",
    )
    _idle(driver)
    metrics = {
        m.find_element(By.CSS_SELECTOR, '[data-testid="stMetricLabel"]').text: m.find_element(
            By.CSS_SELECTOR, '[data-testid="stMetricValue"]'
        ).text
        for m in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]')
    }
    assert metrics["Reviewed findings"] == "1" and metrics["Accepted"] == "100%"
    assert metrics["Studies"] == str(len(expected))
    [model_row] = _grid_rows(driver)
    assert model_row[0].startswith(job_model)
    assert urllib.parse.urlsplit(driver.current_url)[2:] == ("/monitoring", "", "")
    driver.set_window_size(1400, 1500)  # the whole page in one picture
    _idle(driver)
    _shot(driver, tmp_path, "6-monitoring")


def _expected_patients(db: Database) -> list[str]:
    """Patients' names in worklist order: priority (none last), then arrival."""
    with db.session() as s:
        rows = s.execute(select(Study.patient_name, Study.priority, Study.first_received_at)).all()
    rows.sort(key=lambda r: (r.priority is None, r.priority or 0, r.first_received_at))
    return [store.display_name(r.patient_name) for r in rows]


# --- what reaches the browser outside the session ------------------------------------------


def _get(url: str, cookie: str | None = None) -> tuple[int, bytes]:
    """GET with no cookies at all (or just the one given): status and body."""
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _fetched_media(driver: WebDriver) -> set[str]:
    """The /media/ URLs the page has requested so far (from Chromium's network log)."""
    import json

    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if urllib.parse.urlsplit(url).path.startswith("/media/"):
                urls.add(url)
    return urls


def test_nothing_leaves_the_session(dashboard, browser, tmp_path):
    base, db = dashboard
    driver = browser
    # Internal endpoints do not answer before login (nor after).
    assert _get(base + "/_stcore/metrics")[0] == 404
    assert _get(base + "/_stcore/health")[0] == 200

    # A page's address before login shows the login form and nothing of the page.
    for page in ("study", "users", "audit"):
        driver.get(f"{base}/{page}")
        _css(driver, ".st-key-login_name input")
        _idle(driver)
        assert "DEMO" not in driver.page_source and "Audit trail" not in _body(driver)
    driver.get(base + "/")
    _css(driver, ".st-key-login_name input")
    _idle(driver)
    _login(driver, USER)
    _css(driver, ".st-key-wl_pick")
    _idle(driver)
    _pick_lung1(driver)
    _idle(driver)
    _click(driver, ".st-key-wl_open button")
    src = _image_src(driver)
    _idle(driver)
    # The slice is inline: no URL to replay, and no image was fetched from /media/.
    assert src.startswith("data:image/"), src[:60]
    assert all(
        (img.get_attribute("src") or "").startswith("data:")
        for img in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stImage"] img')
    )
    for url in _fetched_media(driver):
        status, body = _get(url)
        assert status == 404 and not body.startswith((b"\xff\xd8", b"\x89PNG")), url

    # A download reaches this browser, and its URL is worthless without this browser's cookie.
    _click(driver, '[data-testid="stDownloadButton"] button', "Download SEG")
    media = _until(driver, lambda d: _fetched_media(d), "the SEG download requested")
    downloads = tmp_path / "downloads"
    _until(
        driver,
        lambda d: [p for p in downloads.glob("*.dcm") if p.stat().st_size > 132],
        "the SEG file saved",
    )
    [saved] = downloads.glob("*.dcm")
    assert saved.read_bytes()[128:132] == b"DICM"
    [url] = media
    assert _get(url)[0] == 404  # no cookies: as an attacker on this machine would ask
    xsrf = driver.get_cookie("_streamlit_xsrf")["value"]
    status, body = _get(url, f"_streamlit_xsrf={xsrf}")
    assert status == 200 and body[128:132] == b"DICM"  # the session's own browser may
    assert _get(base + "/_stcore/metrics", f"_streamlit_xsrf={xsrf}")[0] == 404
    with db.session() as s:
        actions = list(s.execute(select(AuditEntry.action)).scalars())
    assert "study.output_downloaded" in actions

    # Once the session ends, not even its browser gets the file again.
    _click(driver, ".st-key-logout button")
    _css(driver, ".st-key-login_name input")
    _idle(driver)
    assert _get(url, f"_streamlit_xsrf={xsrf}")[0] == 404
