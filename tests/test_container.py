"""The container image end to end: docker/test-container.sh builds the CPU image from the Dockerfile with
podman, runs it, and checks /health and one small job over HTTP.

Slow (a build takes minutes), so it runs only when asked: HOGWILD_TEST_CONTAINER=1 and podman installed
(`make test-container` runs the script directly).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docker" / "test-container.sh"

pytestmark = pytest.mark.container


@pytest.mark.timeout(3600)
def test_container_builds_and_serves_a_job() -> None:
    if os.environ.get("HOGWILD_TEST_CONTAINER") != "1":
        pytest.skip("set HOGWILD_TEST_CONTAINER=1 to build and run the container image")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman buildah runc debootstrap)")
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=3500, check=False
    )
    output = f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0, f"docker/test-container.sh failed:\n{output}"
    assert "PASSED" in proc.stderr
