"""Debian's chromium and chromedriver for the tests that drive a real browser (never a downloaded one)."""

from __future__ import annotations

import os
import shutil

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
