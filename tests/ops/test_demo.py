"""`tokenledger demo` as a newcomer runs it: nothing configured, nothing running."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.support import ROOT, run_cli


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


def _counts(out: str) -> list[str]:
    """The demo's counts: every row of its tables but the rate, without table borders."""
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 2 and cells[1] and "events/s" not in cells[1] \
                and cells[0] not in ("kind", "outcome"):
            rows.append(" = ".join(cells))
    return rows


@pytest.mark.services
@pytest.mark.slow
def test_the_same_seed_reproduces_the_same_counts(settings, db):
    """The stream, and so what the demo publishes and what becomes of it, is drawn from
    the seed alone: token-process starts run before the stream is published, so whether
    one is refused never depends on how far the worker has got. Each run has a queue of its
    own: only the demo's one worker process may apply its stream (another test's worker on
    the session's queue would apply messages out of order)."""
    runs = [run_cli(settings, "demo", "--users", "6", "--events", "300", "--seed", "11",
                    TOKENLEDGER_QUEUE=f"{settings.queue}-demo-{i}") for i in range(2)]
    for done in runs:
        assert done.exit_code == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first, second = (_counts(done.stdout) for done in runs)
    assert any(row.startswith("charges by feature = ") for row in first), first
    assert first == second, "\n".join(f"{a}  |  {b}" for a, b in zip(first, second, strict=False))
