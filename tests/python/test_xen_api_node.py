"""Xen Orchestra's connector (npm `xen-api`) against a real corrald."""
import os
import shutil
import subprocess

import pytest

from conftest import ROOT_PASSWORD

NODE_DIR = os.path.join(os.path.dirname(__file__), "..", "node")


def node_client_ready():
    return shutil.which("node") and os.path.isdir(os.path.join(NODE_DIR, "node_modules", "xen-api"))


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_xen_api_connector(daemon, scheme):
    if not node_client_ready():
        if os.environ.get("CORRAL_REQUIRE_NODE"):
            pytest.fail("node or tests/node/node_modules missing (run npm ci in tests/node)")
        pytest.skip("node or the xen-api package is not installed")
    url = daemon.http if scheme == "http" else daemon.https
    r = subprocess.run(["node", "xen_api_client.mjs", url, ROOT_PASSWORD], cwd=NODE_DIR,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "xen-api client: ok" in r.stdout
