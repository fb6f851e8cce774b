"""`tokenledger demo` as a newcomer runs it: nothing configured, nothing running."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.support import ROOT


def test_the_demo_runs_on_the_embedded_default_and_verifies(tmp_path):
    """Nothing configured: the demo starts the embedded PostgreSQL and Redis in the data
    directory (not the working directory), runs a real worker on them, and verifies."""
    exe = shutil.which("tokenledger")
    assert exe, "the tokenledger entry point is not installed"
    home = tmp_path / "home"
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENLEDGER_")}
    env.update(TOKENLEDGER_HOME=str(home), PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run([exe, "demo", "--users", "30", "--events", "400"], cwd=work,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        out = done.stdout
        assert "the embedded PostgreSQL + Redis" in out
        assert "verify OK" in out
        for line in ("applied", "declined", "duplicate", "conflict (recorded, not applied)",
                     "dead-lettered", "token-process flows"):
            assert line in out
        assert (home / "pgdata" / "PG_VERSION").exists() and (home / "redis").is_dir()
        assert list(work.iterdir()) == []  # nothing left in the working directory
        again = subprocess.run([exe, "verify"], cwd=work, env=env, capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0 and "verify OK" in again.stdout, again.stderr
    finally:
        subprocess.run([exe, "embedded", "stop"], env=env, capture_output=True, timeout=60)
