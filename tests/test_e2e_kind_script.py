"""``deploy/e2e-kind.sh`` (``make e2e-kind``) cannot run here (no Docker): it
must at least parse, and say clearly which prerequisites are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "e2e-kind.sh"


def test_the_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_missing_tools_are_named_with_where_to_get_them(tmp_path: Path) -> None:
    # A PATH holding only what the script needs before its check.
    for tool in ("dirname",):
        (tmp_path / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(tmp_path)}

    result = subprocess.run(
        [shutil.which("bash"), str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 1
    for tool in ("docker", "kind", "kubectl", "istioctl", "helm"):
        assert f"  {tool}: install it, see https://" in result.stderr


def test_make_has_the_target() -> None:
    assert (
        "\ne2e-kind: setup\n\tdeploy/e2e-kind.sh\n" in (ROOT / "Makefile").read_text()
    )
