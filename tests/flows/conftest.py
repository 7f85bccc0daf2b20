"""Fixtures for the tests that run Prefect flows: one Prefect test server, started by the first test that
asks for it (`pytestmark = pytest.mark.usefixtures("prefect_server")`), not for every test."""

from __future__ import annotations

import os
import tempfile

import pytest

# Prefect's temporary server and its database live in a throwaway folder, not in ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# On a loaded two-core machine the temporary server can take longer than the default to come up.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# Prefect binds its console log handler to the sys.stderr of the moment it is first imported. Import it
# here, under pytest's session-wide capture, so that a flow first run inside a CliRunner (whose stream is
# closed afterwards) does not leave every later flow logging into a closed file.
import prefect  # noqa: E402,F401


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the session, stopped while pytest still owns the output streams."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield
