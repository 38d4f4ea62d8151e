"""asyncua's own tracebacks as one line naming the device, the traceback itself at DEBUG.

asyncua logs `Publish iteration crashed` (and a few more) with a traceback at ERROR whenever a
connection dies under its loops: twice per server restart, at the default log level, for what the
poller already reports in one line. A filter on asyncua's client loggers rewrites such a record:

- a dead connection (socket closed, channel or session gone): INFO, which the CLI's default level for
  asyncua (WARNING) leaves out; the poller's own line says the device is down and when it is back;
- anything else (a real error): WARNING, so it stays visible;
- the same record again for the same device before it reconnects: DEBUG (logged once when it starts);
- the traceback: a DEBUG record of `edge_agent.drivers.opcua`.

The device is known from a context variable the driver sets while it connects and subscribes:
asyncua's tasks (the publish loop, the supervisor) are created then and keep a copy of it.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar

from asyncua import ua

from edge_agent.drivers.opcua.codecs import _status_name

log = logging.getLogger("edge_agent.drivers.opcua")

DEVICE: ContextVar[str | None] = ContextVar("edge_agent_opcua_device", default=None)

# the loggers of asyncua's client side that log exceptions (a filter sees only its own logger's records)
LOGGERS = (
    "asyncua.client.client",
    "asyncua.client.ua_session.UaSession",
    "asyncua.client.ua_client.UaClient",
    "asyncua.client.ua_client.UASocketProtocol",
    "asyncua.common.subscription",
)
_GONE = {
    ua.StatusCodes.BadConnectionClosed,
    ua.StatusCodes.BadSecureChannelClosed,
    ua.StatusCodes.BadSecureChannelIdInvalid,
    ua.StatusCodes.BadSessionClosed,
    ua.StatusCodes.BadSessionIdInvalid,
    ua.StatusCodes.BadServerHalted,
    ua.StatusCodes.BadShutdown,
    ua.StatusCodes.BadCommunicationError,
    ua.StatusCodes.BadNotConnected,
    ua.StatusCodes.BadDisconnect,
    ua.StatusCodes.BadTimeout,
}


def connection_gone(exc: BaseException) -> bool:
    """The exception says the connection (socket, secure channel or session) is gone: not a bug."""
    if isinstance(exc, ua.UaStatusCodeError):
        return exc.code in _GONE
    return isinstance(exc, OSError | TimeoutError | asyncio.TimeoutError | EOFError)


def _what(exc: BaseException) -> str:
    if isinstance(exc, ua.UaStatusCodeError):
        return _status_name(exc.code)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class OneLineTracebacks(logging.Filter):
    """Rewrites asyncua's records that carry a traceback (see the module's docstring); others pass as they are."""

    def __init__(self) -> None:
        super().__init__()
        self._said: set[tuple[str | None, str]] = set()

    def forget(self, device: str) -> None:
        """A new session of `device`: its next failure is news again."""
        self._said = {k for k in self._said if k[0] != device}

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite or drop a record with a traceback; never raises."""
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        device = DEVICE.get()
        where = f"device {device}: " if device else ""
        try:
            text = " ".join(record.getMessage().split())
        except Exception:  # a broken format string: say what we can
            text = str(record.msg)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%sasyncua: %s", where, text, exc_info=record.exc_info)
        gone = connection_gone(exc)
        key = (device, str(record.msg))
        level = logging.DEBUG if key in self._said else (logging.INFO if gone else logging.WARNING)
        self._said.add(key)
        level = min(level, record.levelno)
        if not logging.getLogger(record.name).isEnabledFor(level):
            return False
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.msg = f"{where}asyncua: {text}: {_what(exc)}" + ("" if gone else " (traceback at DEBUG)")
        record.args = None
        record.exc_info, record.exc_text = None, None
        return True


ONE_LINE = OneLineTracebacks()


def install() -> None:
    """Put the filter on asyncua's client loggers (once)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if ONE_LINE not in logger.filters:
            logger.addFilter(ONE_LINE)
