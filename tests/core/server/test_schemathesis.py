"""Schemathesis over the served ``/openapi.json``: no generated request gets a server error.

Every operation in the schema is exercised (schemathesis' coverage phase, with undeclared
methods, wrong content types and malformed bodies, then a fuzzing phase, positive and
negative) with the only check that the response is not a 5xx. The server is stricter than
its schema (400/415/422 answers the schema does not declare), so the conformance checks
would fail on purpose-built validation and are left out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tgi_core.config import load_config
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry
from tgi_core.server.app import build_app
from tgi_core.server.builder import build_state

pytestmark = pytest.mark.slow


@pytest.fixture
def api_schema(tiny_llama: Path) -> schemathesis.BaseSchema:
    resolved = load_config(
        cli={"model_id": str(tiny_llama), "max_batch_total_tokens": "4096", "dtype": "float32"},
        environ={},
    )
    registry = Registry.build(make_plugin_manager(environ={"TGI_LOAD_PLUGINS": "tgi-llama"}))
    resolved = resolved.with_registry(registry)
    app = build_app(build_state(resolved, registry), registry, resolved.plugin_sections)
    # Loading over ASGI starts the app's lifespan (the engine and its warm-up), and the calls
    # reuse it; schemathesis' pytest plugin ends it when the test tears down.
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's lazy schema reads `Node._nodeid`, which pytest 9.2 no longer has.
    request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_error(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error])
