"""Logging for felixpy's daemons: Calico's line format or JSON, screen and file, no secret in any line.

Every felixpy process that logs for an operator (felixpy-node, felixpy-controllers) calls
`setup_logging` once. The text format is Felix's (libcalico-go's logrus formatter), so the grep
patterns and log parsers of a Calico operator keep working:

    2026-12-04 09:17:48.238 [INFO][85386] agent.py 434: agent starting node=n1

(local time to the millisecond, level in capitals with Calico's names -- FATAL for Python's
CRITICAL --, pid, source file and line, the message). `json` writes one object per line with the
same fields: {"time", "level", "pid", "file", "line", "logger", "msg"}.

Secrets: code never logs a password on purpose, and `REDACTOR` is the safety net behind that. The
secret resolver registers every value it resolves (and its base64 form, the spelling ExaBGP's
configuration uses); every formatted line -- message, arguments and traceback alike -- has those
values replaced by `<redacted>` before it reaches a handler. Values shorter than
MIN_REDACTED_LENGTH are not replaced: replacing every "a" would make the logs unreadable while
hiding nothing a one-letter password does not already give away.
"""

from __future__ import annotations

import base64
import json
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
from typing import Iterable

REDACTED = "<redacted>"
MIN_REDACTED_LENGTH = 3
# Felix's TRACE, below DEBUG. felixpy logs nothing at it, so TRACE shows what DEBUG shows.
TRACE = 5
logging.addLevelName(TRACE, "TRACE")
# Python's level names -> Calico's (logrus) spelling in the text and JSON formats.
_CALICO_LEVEL = {"CRITICAL": "FATAL", "WARN": "WARNING"}


def python_level(name: str) -> int:
    """logging level number for Calico's level names (TRACE, FATAL, PANIC, WARN accepted)."""
    upper = name.strip().upper()
    upper = {"FATAL": "CRITICAL", "PANIC": "CRITICAL", "WARN": "WARNING"}.get(upper, upper)
    level = logging.getLevelName(upper)
    if not isinstance(level, int):
        raise ValueError(f"unknown log level {name!r}")
    return level


class Redactor:
    """The secret values no log line may contain (thread-safe; values are never logged)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()

    def register(self, value: str | None) -> None:
        """Hide `value` (and its base64 form) from every log line from now on."""
        if not value:
            return
        forms = {value, value.strip(), base64.b64encode(value.encode()).decode()}
        with self._lock:
            known = set(self._values)
            new = {f for f in forms if len(f) >= MIN_REDACTED_LENGTH} - known
            if new:
                # Longest first, so a value containing another one is replaced whole.
                self._values = tuple(sorted(known | new, key=len, reverse=True))

    def redact(self, text: str) -> str:
        values = self._values  # an immutable snapshot: no lock on the hot path
        for value in values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def redact_all(self, texts: Iterable[str]) -> list[str]:
        return [self.redact(t) for t in texts]

    def clear(self) -> None:
        """Forget every value (tests)."""
        with self._lock:
            self._values = ()


REDACTOR = Redactor()


class CalicoFormatter(logging.Formatter):
    """Felix's text format; see the module docstring."""

    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__()
        self._redactor = redactor

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        level = _CALICO_LEVEL.get(record.levelname, record.levelname)
        text = (f"{self.formatTime(record)} [{level}][{record.process}] {record.filename} {record.lineno}: "
                f"{record.getMessage()}")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return self._redactor.redact(text)


class JSONFormatter(CalicoFormatter):
    """One JSON object per line with the text format's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": _CALICO_LEVEL.get(record.levelname, record.levelname),
            "pid": record.process,
            "file": record.filename,
            "line": record.lineno,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # Redact the serialised line: a secret must not survive in any field, escaped or not.
        return self._redactor.redact(json.dumps(entry))


class DebugFileFilter(logging.Filter):
    """Felix's LogDebugFilenameRegex: debug and trace lines only from matching source files."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self._regex = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG or bool(self._regex.search(record.filename))


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JSONFormatter()
    if fmt == "text":
        return CalicoFormatter()
    raise ValueError(f"unknown log format {fmt!r} (text or json)")


def setup_logging(screen_level: str, fmt: str = "text", *, file_path: str | None = None,
                  file_level: str = "INFO", debug_file_regex: str | None = None) -> None:
    """Configure the root logger: stderr at `screen_level`, and `file_path` at `file_level` if given.

    The file is opened with a WatchedFileHandler, so logrotate may move it away. Raises OSError
    (naming the path) when the file cannot be opened. `debug_file_regex` keeps debug lines only
    from source files whose base name it matches (Felix's LogDebugFilenameRegex, unanchored as
    Go's MatchString).
    """
    handlers: list[logging.Handler] = []
    screen = logging.StreamHandler(sys.stderr)
    screen.setLevel(python_level(screen_level))
    screen.setFormatter(formatter(fmt))
    handlers.append(screen)
    if file_path:
        directory = os.path.dirname(file_path)
        try:
            if directory:
                os.makedirs(directory, exist_ok=True)
            handler: logging.Handler = logging.handlers.WatchedFileHandler(file_path)
        except OSError as err:
            raise OSError(err.errno, f"cannot open log file {file_path}: {err.strerror}") from None
        handler.setLevel(python_level(file_level))
        handler.setFormatter(formatter(fmt))
        handlers.append(handler)
    if debug_file_regex:
        for handler in handlers:
            handler.addFilter(DebugFileFilter(debug_file_regex))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()  # a StreamHandler leaves its stream open; a FileHandler closes its file
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(min(h.level for h in handlers))
