"""Debian's chromium and chromedriver for the tests that drive a real browser (never a downloaded one)."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest


def require_chromium() -> tuple[str, str]:
    """Paths of ``chromium`` and ``chromedriver``; without them the test skips, or fails where the browser
    is required (``COSOD_TEST_BROWSER=required``, set by ``.ci/run``)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        reason = "chromium and chromedriver are not installed: run `make browser`"
        if os.environ.get("COSOD_TEST_BROWSER") == "required":
            pytest.fail(reason)
        pytest.skip(reason)
    return browser, driver


def login(driver: Any, url: str, user: str, password: str) -> None:
    """Log in through Label Studio's own form at ``url``; returns once the browser has left the login page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/user/login/")
    driver.find_element(By.NAME, "email").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 30).until(lambda d: "/user/login" not in d.current_url)
