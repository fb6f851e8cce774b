"""docker-compose.yml is valid (``docker-compose config``) and has the production shape.

Needs the ``docker-compose`` binary only (Debian: ``apt-get install -y docker-compose``),
never a Docker engine. Skips without it on a laptop; fails under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import IN_CI, ROOT

APP_SERVICES = ("migrate", "api", "worker", "beat", "flower")


def compose_binary() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    message = "docker-compose is not installed (apt-get install -y docker-compose)"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def run_config(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` on a copy of the project's compose file, with the env
    files made from their examples as an operator would."""
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    (tmp_path / "deploy").mkdir(exist_ok=True)
    shutil.copy(ROOT / "deploy" / "flower.env.example", tmp_path / "deploy" / "flower.env")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("POSTGRES_", "TOKENLEDGER_", "COMPOSE_"))}
    return subprocess.run([*compose_binary(), "config"], cwd=tmp_path, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    done = run_config(tmp_path_factory.mktemp("compose"), POSTGRES_PASSWORD="pw-for-test")
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def test_it_has_every_service_of_the_production_shape(config):
    assert set(config["services"]) == {"postgres", "redis", *APP_SERVICES}
    assert set(config["volumes"]) >= {"postgres-data", "redis-data"}


def test_redis_keeps_an_append_only_file_and_is_not_published(config):
    redis = config["services"]["redis"]
    assert "ports" not in redis
    cmd = command(redis)
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(str(v).split(":")[0] == "redis-data" and ":/data" in str(v)
               for v in redis["volumes"])


def test_postgres_has_a_named_volume_and_no_published_port(config):
    postgres = config["services"]["postgres"]
    assert "ports" not in postgres
    assert any(str(v).startswith("postgres-data:") for v in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_migrate_runs_once_before_everything_that_needs_the_schema(config):
    services = config["services"]
    migrate = services["migrate"]
    assert command(migrate) == ["tokenledger", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "beat"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name


def test_workers_scale_and_there_is_exactly_one_beat(config):
    services = config["services"]
    worker = services["worker"]
    assert command(worker)[:2] == ["tokenledger", "worker"]
    assert "container_name" not in worker and "ports" not in worker
    beats = [n for n, s in services.items() if "beat" in command(s)]
    assert beats == ["beat"]
    assert "deploy" not in services["beat"] or \
        services["beat"]["deploy"].get("replicas", 1) == 1
    assert "-B" not in command(worker) and "--beat" not in command(worker)


def test_flower_requires_basic_auth_from_its_env_file(config):
    flower = config["services"]["flower"]
    cmd = command(flower)
    assert cmd[:2] == ["tokenledger", "flower"] and "--unsafe-no-auth" not in cmd
    user, _, password = flower["environment"]["TOKENLEDGER_FLOWER_BASIC_AUTH"].partition(":")
    assert user and password


def test_healthchecks_guard_every_long_running_service(config):
    for name in ("postgres", "redis", "api", "worker", "flower"):
        check = config["services"][name]["healthcheck"]
        assert check["test"] and check["interval"], name


def test_all_app_services_run_one_image_built_from_the_dockerfile(config):
    images = {config["services"][n]["image"] for n in APP_SERVICES}
    assert len(images) == 1
    for name in APP_SERVICES:
        service = config["services"][name]
        assert service["build"]["dockerfile"] == "Dockerfile"
        env = service["environment"]
        assert env["TOKENLEDGER_DATABASE_URL"] == \
            "postgresql://tokenledger:pw-for-test@postgres:5432/tokenledger"
        assert env["TOKENLEDGER_BROKER_URL"] == "redis://redis:6379/0"
    assert config["services"]["worker"]["environment"]["TOKENLEDGER_METRICS_PORT"] == "9100"


def test_the_database_password_must_be_chosen(tmp_path):
    done = run_config(tmp_path)
    assert done.returncode != 0
    assert "POSTGRES_PASSWORD" in done.stderr


def test_the_image_is_slim_locked_and_runs_as_a_non_root_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert "uv sync --frozen" in dockerfile
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "deploy/*.env" in ignored
