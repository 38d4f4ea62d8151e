"""Logging for every command: one format on stderr, quiet protocol libraries, and no password in any record."""

from __future__ import annotations

import logging
import re
import sys

# a password in a protocol object's repr (asyncua's UserNameIdentityToken: Password=b'…') or a dict ('password': '…')
_SECRET = re.compile(
    r"""(?i)(\w*(?:password|passwd)\w*=|['"]\w*(?:password|passwd)\w*['"]\s*:\s*)"""
    r"""(b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*")"""
)


class RedactSecrets(logging.Filter):
    """Blank out passwords in every record, whichever library logged it (the last guard; log levels are the first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message when it shows a password; never drops a record."""
        try:
            text = record.getMessage()
        except Exception:  # a broken format string: the formatter reports it, a filter must not raise
            return True
        clean = _SECRET.sub(r"\1'***'", text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


_REDACT = RedactSecrets()


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_REDACT)  # on the handlers: a logger's filter does not see its children's records
    debug = level.upper() == "DEBUG"
    # pymodbus logs every connection error itself; the poller reports each outage once
    logging.getLogger("pymodbus").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    # the protocol libraries log every session and socket at INFO; our own lines say what matters
    for name in ("asyncua", "snap7"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    # asyncua's client logs every request and answer whole at DEBUG, the session's user identity token
    # (user name and password) included: never wanted, whatever the level
    logging.getLogger("asyncua.client.ua_client").setLevel(logging.INFO if debug else logging.WARNING)
