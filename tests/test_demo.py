"""`tokenledger demo` as a newcomer runs it: nothing configured, nothing running."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_the_demo_runs_on_the_embedded_default_and_verifies(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENLEDGER_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", "from tokenledger.cli import main; main()", "demo",
         "--users", "30", "--events", "400"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "SQLite + embedded broker" in out
    assert "verify OK" in out
    for line in ("applied", "declined", "duplicate", "conflict (recorded, not applied)",
                 "dead-lettered", "token-process flows"):
        assert line in out
    assert (tmp_path / "tokenledger.sqlite").exists()
