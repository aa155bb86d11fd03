"""The study page's comparison with the prior in a real browser: `radai dashboard` on the two
synthetic studies of one patient that test_dashboard_compare builds, driven through Debian's
headless Chromium; the comparison turned on shows the prior and the current slice side by side,
the tracked nodule outlined in both (checked in the pixels of the images the browser received),
and is saved as `7-compare-with-prior.png` (var/screenshots/, as the other browser test does).

Skipped without `chromium` and `chromium-driver`, except under CI (CI=true), where it fails.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from db import Job, Study
from db.session import Database
from tests.integration import test_dashboard_compare as compare
from tests.system.test_dashboard_browser import (
    USER,
    _click,
    _css,
    _idle,
    _login,
    _pick,
    _shot,
    _until,
    browser,  # noqa: F401 - a fixture
    dashboard,  # noqa: F401 - a fixture, here on this module's template
)

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

# Selenium's By.CSS_SELECTOR, spelled out: without selenium this module must still import, so
# that the browser fixture can skip (or, in CI, fail) with its message.
CSS = "css selector"

# The two synthetic studies (and the refused ones) instead of the processed sample study.
template = compare.template

pytestmark = pytest.mark.slow


def _images(driver: WebDriver) -> list[str]:
    return [
        e.get_attribute("src") for e in driver.find_elements(CSS, '[data-testid="stImage"] img')
    ]


def _yellow(src: str) -> int:
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return int(((r > 170) & (g > 150) & (r - b > 90) & (g - b > 90)).sum())


def test_prior_and_current_side_by_side_in_a_browser(dashboard, browser, tmp_path):  # noqa: F811
    base, db = dashboard
    try:
        _walk(base, db, browser, tmp_path)
    except BaseException:
        _shot(browser, tmp_path, "compare-failure")
        raise


def _walk(base: str, db: Database, driver: WebDriver, tmp_path: Path) -> None:
    with db.session() as s:
        job_id = s.execute(
            select(Job.id).join(Study).where(Study.study_uid == compare.CURRENT.study_uid)
        ).scalar_one()
    driver.get(base + "/")
    _css(driver, ".st-key-login_name input")
    _idle(driver)
    _login(driver, USER)
    _css(driver, ".st-key-wl_pick")
    _idle(driver)
    _pick(driver, "wl_pick", "2024-07-01")  # the current study (the prior is of 2024-01-01)
    _until(
        driver,
        lambda d: "2024-07-01" in _css(d, ".st-key-wl_pick input").get_attribute("value"),
        "the current study picked",
    )
    _click(driver, ".st-key-wl_open button")
    _until(driver, lambda d: len(_images(d)) == 1, "the study viewer")
    _idle(driver)
    _click(driver, f".st-key-cmp_on_{job_id} label")
    _until(driver, lambda d: len(_images(d)) == 3, "the prior beside the current study")
    _idle(driver)
    _, prior, current = _images(driver)
    assert prior.startswith("data:image/jpeg;base64,") and current.startswith("data:image/")
    assert _yellow(prior) > 40 and _yellow(current) > 40
    captions = [e.text for e in driver.find_elements(CSS, '[data-testid="stImageCaption"]')]
    assert captions[1].startswith("Prior · slice 10 of 24 · Nodule A outlined"), captions
    assert captions[2].startswith("Current · slice 25 of 40 · Nodule A outlined"), captions
    picked = _css(driver, f".st-key-cmp_nodule_{job_id} input").get_attribute("value")
    assert "Nodule A · volume +73% · doubling time 231 d" in picked, picked
    driver.set_window_size(1400, 1250)
    driver.execute_script(
        "arguments[0].scrollIntoView({block: 'start'});",
        _css(driver, f".st-key-cmp_nodule_{job_id}"),
    )
    _idle(driver)
    _shot(driver, tmp_path, "7-compare-with-prior")
