"""Structured logging: readable lines on a terminal, JSON lines everywhere else.

``configure_logging()`` sets up structlog and routes the standard library's logging
(uvicorn, litestar, transformers) through the same processors, so every line of a
server has one format. ``bind_request_id()`` attaches a request id to every line
logged while a request is handled, in whatever task or thread logs it through
structlog's context variables.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import structlog

#: uvicorn's level below DEBUG; ``--log-level trace`` turns it on.
TRACE = 5
_LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: Standard-library loggers that get their handlers replaced by ours.
_FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "litestar", "httpx")


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def configure_logging(
    *, json_output: bool | None = None, level: str = "info", stream: IO[str] | None = None
) -> None:
    """Configure structlog and the standard library's root logger.

    :param json_output: force JSON lines (True) or the console renderer (False);
        ``None`` picks the console renderer only when ``stream`` is a terminal.
    :param level: ``trace``, ``debug``, ``info``, ``warning`` or ``error``.
    :param stream: where lines go; standard error by default.
    """
    stream = sys.stderr if stream is None else stream
    if json_output is None:
        json_output = not (hasattr(stream, "isatty") and stream.isatty())
    renderer: Any
    if json_output:
        renderer = structlog.processors.JSONRenderer()
        final = [structlog.processors.dict_tracebacks, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        final = [renderer]
    shared = _shared_processors()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(_LEVELS[level])
    for name in _FOREIGN_LOGGERS:
        foreign = logging.getLogger(name)
        foreign.handlers = []
        foreign.propagate = True
    logging.getLogger("httpx").setLevel(max(_LEVELS[level], logging.WARNING))


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger that goes through the configured pipeline."""
    return structlog.stdlib.get_logger(name)


def new_request_id() -> str:
    """A fresh, unique request id."""
    return uuid.uuid4().hex


@contextmanager
def bind_request_id(request_id: str | None = None) -> Iterator[str]:
    """Attach ``request_id`` (a new one if None) to every line logged inside the block."""
    request_id = request_id or new_request_id()
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        yield request_id
