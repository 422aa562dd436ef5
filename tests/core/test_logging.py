"""Logging: console lines on a terminal, JSON otherwise, stdlib loggers and request ids."""

from __future__ import annotations

import io
import json
import logging

import pytest

from tgi_core.logging import bind_request_id, configure_logging, get_logger


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers, root.level = handlers, level


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream)
    get_logger("tgi_core.test").info("model loaded", layers=30)
    (line,) = json_lines(stream)
    assert line["event"] == "model loaded" and line["layers"] == 30
    assert line["level"] == "info" and line["logger"] == "tgi_core.test"
    assert line["timestamp"].endswith("Z")


def test_console_renderer_on_a_terminal() -> None:
    stream = FakeTerminal()
    configure_logging(stream=stream)
    get_logger("tgi_core.test").warning("slow step", ms=12)
    text = stream.getvalue()
    assert "slow step" in text and "ms" in text and "12" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_json_output_is_forced_even_on_a_terminal() -> None:
    stream = FakeTerminal()
    configure_logging(json_output=True, stream=stream)
    get_logger().info("hello")
    assert json_lines(stream)[0]["event"] == "hello"


def test_stdlib_loggers_share_the_pipeline_and_request_id() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream, level="debug")
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.handlers = [logging.NullHandler()]  # what uvicorn installs on its own
    configure_logging(stream=stream, level="debug")
    with bind_request_id("req-123") as request_id:
        uvicorn_logger.info("Started server process [%d]", 42)
        get_logger("tgi_core.engine").debug("scheduled", tokens=5)
    get_logger("tgi_core.engine").info("after the request")
    first, second, third = json_lines(stream)
    assert request_id == "req-123"
    assert first["event"] == "Started server process [42]" and first["logger"] == "uvicorn.error"
    assert first["request_id"] == second["request_id"] == "req-123"
    assert "request_id" not in third


def test_levels_filter() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream, level="warning")
    get_logger().info("hidden")
    get_logger().error("shown")
    assert [line["event"] for line in json_lines(stream)] == ["shown"]


def test_new_request_ids_are_unique() -> None:
    with bind_request_id() as first, bind_request_id() as second:
        assert first != second and len(first) == 32
