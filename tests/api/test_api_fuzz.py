"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis).

Every operation gets valid and invalid requests (bodies, query strings, paths, headers)
against the real server, database, broker and worker: no answer may be a 5xx, and every
error is the JSON envelope.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.api.support import ServerThread, api_server
from tests.support import Worker, session_scope
from tokenledger import Settings
from tokenledger.api import create_app
from tokenledger.apikeys.service import create_key

pytestmark = pytest.mark.services
__all__ = ["api_server"]
EXAMPLES = 30

# The document is the app's own; building the app touches no database or broker.
SCHEMA = schemathesis.openapi.from_dict(
    create_app(Settings(database_url="postgresql://schema@127.0.0.1:1/none",
                        broker_url="redis://127.0.0.1:1/0")).openapi())
OPERATIONS = sorted(op.ok().label for op in SCHEMA.get_all_operations())
# Invalid input needs some input: operations without parameters only get valid requests.
CASES = [pytest.param(label, mode, id=f"{label}-{mode.value}")
         for label in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode is GenerationMode.POSITIVE or any(
             len(part) for op in [SCHEMA.find_operation_by_label(label)] if op is not None
             for part in (op.path_parameters, op.query, op.headers, op.body))]


@pytest.fixture(scope="module")
def admin_key(settings: Settings) -> Iterator[str]:
    with session_scope(settings) as session:
        created = create_key(session, "admin", "fuzz")
    yield created.key


def check(response: object, case: schemathesis.Case) -> None:
    status = response.status_code  # type: ignore[attr-defined]
    text = response.text  # type: ignore[attr-defined]
    assert status < 500, (case.method, case.formatted_path, case.query, case.body, status,
                          text[:500])
    if status >= 400:
        body = response.json()  # type: ignore[attr-defined]
        assert body["success"] is False and body["status"] == status, text[:500]


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_no_request_gets_a_5xx(label: str, mode: GenerationMode, api_server: ServerThread,
                               admin_key: str, worker: Worker) -> None:
    operation = SCHEMA.find_operation_by_label(label)
    assert operation is not None

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case) -> None:
        headers = dict(case.headers or {})
        headers["x-server-api-key"] = admin_key
        check(case.call(base_url=api_server.url, headers=headers, timeout=90), case)

    fuzz()


@pytest.mark.parametrize("label", [op for op in OPERATIONS if " /api/" in op])
def test_without_a_key_every_api_operation_is_401(label: str,
                                                  api_server: ServerThread) -> None:
    operation = SCHEMA.find_operation_by_label(label)
    assert operation is not None

    @given(case=operation.as_strategy())
    @settings(max_examples=5, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case) -> None:
        headers = {k: v for k, v in (case.headers or {}).items()
                   if k.lower() != "x-server-api-key"}
        response = case.call(base_url=api_server.url, headers=headers, timeout=30)
        assert response.status_code == 401, response.text
        assert response.json() == {"success": False, "status": 401,
                                   "message": "Invalid server API key"}

    fuzz()
