"""felixpy/logs.py: Calico's line format, JSON, the log file, levels, and redaction of secrets."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator

import pytest

from felixpy.config import ConfigError, load_config
from felixpy.logs import REDACTED, REDACTOR, CalicoFormatter, JSONFormatter, python_level, setup_logging

# 2017-01-05 09:17:48.238 [INFO][85386] endpoint_mgr.go 434: message  (libcalico-go's logrus formatter)
CALICO_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[(?P<level>[A-Z]+)\]\[(?P<pid>\d+)\] "
                         r"(?P<file>\S+) (?P<line>\d+): (?P<msg>.*)$")


def _record(level: int, msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("felixpy.node.agent", level, "/x/felixpy/node/agent.py", 42, msg, args, exc_info)


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    REDACTOR.clear()
    yield
    REDACTOR.clear()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_text_is_felix_line_format() -> None:
    line = CalicoFormatter().format(_record(logging.INFO, "agent starting node=%s", "n1"))
    m = CALICO_LINE.match(line)
    assert m, line
    assert (m["level"], int(m["pid"]), m["file"], m["line"], m["msg"]) == \
        ("INFO", os.getpid(), "agent.py", "42", "agent starting node=n1")


@pytest.mark.parametrize("level,name", [(logging.DEBUG, "DEBUG"), (logging.WARNING, "WARNING"),
                                        (logging.ERROR, "ERROR"), (logging.CRITICAL, "FATAL")])
def test_levels_use_calicos_names(level: int, name: str) -> None:
    m = CALICO_LINE.match(CalicoFormatter().format(_record(level, "x")))
    assert m and m["level"] == name


def test_json_has_the_same_fields_one_object_per_line() -> None:
    line = JSONFormatter().format(_record(logging.ERROR, "apply failed: %s", "rc=1", exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["pid"] == os.getpid() and entry["file"] == "agent.py"
    assert entry["line"] == 42 and entry["logger"] == "felixpy.node.agent" and entry["msg"] == "apply failed: rc=1"
    assert "RuntimeError: boom" in entry["exception"]


def test_registered_secrets_never_reach_a_line_in_either_format() -> None:
    REDACTOR.register("s3cret-pw")
    b64 = base64.b64encode(b"s3cret-pw").decode()
    for fmt in (CalicoFormatter(), JSONFormatter()):
        line = fmt.format(_record(logging.WARNING, "config %s and md5-password %s;", "s3cret-pw", b64))
        assert "s3cret" not in line and b64 not in line and line.count(REDACTED) == 2


def test_secret_in_a_traceback_is_redacted() -> None:
    REDACTOR.register("tb-secret-value")
    try:
        raise ValueError("bad password tb-secret-value")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "tb-secret-value" not in CalicoFormatter().format(record)


def test_very_short_values_are_not_redacted() -> None:
    REDACTOR.register("ab")
    assert CalicoFormatter().format(_record(logging.INFO, "table abc")).endswith("table abc")


def test_screen_and_file_have_their_own_levels(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "log" / "felix.log"
    setup_logging("WARNING", "text", file_path=str(path), file_level="DEBUG")
    log = logging.getLogger("felixpy.test")
    log.debug("only in the file")
    log.warning("in both")
    for handler in logging.getLogger().handlers:
        handler.flush()
    err = capfd.readouterr().err
    assert "in both" in err and "only in the file" not in err
    lines = path.read_text().splitlines()
    assert [CALICO_LINE.match(ln)["msg"] for ln in lines] == ["only in the file", "in both"]  # type: ignore[index]


def test_log_file_that_cannot_be_opened_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"cannot open log file .*/file/felix.log"):
        setup_logging("INFO", "text", file_path=str(tmp_path / "file" / "felix.log"))


def test_python_level_accepts_calicos_names() -> None:
    assert python_level("fatal") == python_level("PANIC") == logging.CRITICAL
    assert python_level("Warn") == logging.WARNING
    with pytest.raises(ValueError):
        python_level("LOUD")


def test_log_variables_in_the_agents_config() -> None:
    env = {"ETCD_ENDPOINTS": "http://127.0.0.1:2379"}
    felix = load_config(env).felix
    assert felix.log_file_path is None and felix.log_severity_file == "INFO"  # calico-node's: no file
    felix = load_config({**env, "FELIX_LOGFILEPATH": "/var/log/calico/felix.log",
                         "FELIX_LOGSEVERITYFILE": "debug"}).felix
    assert felix.log_file_path == "/var/log/calico/felix.log" and felix.log_severity_file == "DEBUG"
    assert load_config({**env, "FELIX_LOGFILEPATH": "None"}).felix.log_file_path is None
    with pytest.raises(ConfigError, match=r'^FELIX_LOGFILEPATH="felix.log": expected an absolute path'):
        load_config({**env, "FELIX_LOGFILEPATH": "felix.log"})
    with pytest.raises(ConfigError, match=r'^FELIX_LOGSEVERITYFILE="LOUD": accepted values'):
        load_config({**env, "FELIX_LOGSEVERITYFILE": "LOUD"})


def test_agent_stops_with_one_line_when_the_log_file_cannot_be_opened(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "file").write_text("")
    env = {"PATH": os.environ.get("PATH", ""), "ETCD_ENDPOINTS": "http://127.0.0.1:9",
           "FELIX_LOGFILEPATH": str(tmp_path / "file" / "felix.log")}
    done = subprocess.run([sys.executable, "-m", "felixpy.node.main"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"felixpy-node: FELIX_LOGFILEPATH: cannot open log file {tmp_path}/file/felix.log: ")


def test_trace_is_felixs_level_below_debug() -> None:
    assert python_level("trace") < logging.DEBUG
    env = {"ETCD_ENDPOINTS": "http://127.0.0.1:2379", "FELIX_LOGSEVERITYSCREEN": "trace"}
    assert load_config(env).felix.log_severity_screen == "TRACE"


def test_debug_lines_only_from_files_matching_the_regex(capfd: pytest.CaptureFixture[str]) -> None:
    setup_logging("DEBUG", "text", debug_file_regex=r"secrets\.py|bgp")
    for filename, level, msg in (("secrets.py", logging.DEBUG, "kept: matching file"),
                                 ("agent.py", logging.DEBUG, "dropped: other file"),
                                 ("agent.py", logging.INFO, "kept: not a debug line"),
                                 ("bgp.py", logging.DEBUG, "kept: unanchored match")):
        record = logging.LogRecord("x", level, f"/x/{filename}", 1, msg, (), None)
        logging.getLogger().handle(record)
    err = capfd.readouterr().err
    assert "dropped" not in err and err.count("kept:") == 3


def test_debug_filename_regex_in_the_config() -> None:
    env = {"ETCD_ENDPOINTS": "http://127.0.0.1:2379"}
    assert load_config(env).felix.log_debug_filename_regex is None
    assert load_config({**env, "FELIX_LOGDEBUGFILENAMEREGEX": "bgp.*"}).felix.log_debug_filename_regex == "bgp.*"
    with pytest.raises(ConfigError, match=r'^FELIX_LOGDEBUGFILENAMEREGEX="\(": expected a regular expression'):
        load_config({**env, "FELIX_LOGDEBUGFILENAMEREGEX": "("})
