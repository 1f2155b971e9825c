"""Shared test set-up.

Services come from the environment that scripts/test.sh prepares; each
fixture module skips its tests when a service is absent, unless
VOLMOVE_TEST_REQUIRE=1 (set by CI), where an absent service is a failure.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.docker", "tests.fixtures.mqtt"]


def require_or_skip(what: str) -> None:
    """Skip locally, fail in CI, when a service the test needs is missing."""
    if os.environ.get("VOLMOVE_TEST_REQUIRE") == "1":
        pytest.fail(f"{what} is required but not available")
    pytest.skip(f"{what} not available")
