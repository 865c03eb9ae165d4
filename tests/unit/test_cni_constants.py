"""The CNI protocol constants: one Python home (cni/plugin.py), repeated verbatim by the C shim."""

from __future__ import annotations

import ast
import pathlib
import re

from felixpy.cni import plugin, server

ROOT = pathlib.Path(__file__).resolve().parents[2]
C_SOURCE = ROOT / "cni-shim" / "felixpy-cni.c"

# plugin.py's names for the constants both plugins must agree on (C name -> Python name).
C_TO_PYTHON = {"DEFAULT_SOCKET": "DEFAULT_SOCKET", "DEFAULT_VERSION": "DEFAULT_VERSION",
               "ACCEPT_TIMEOUT": "ACCEPT_TIMEOUT", "REPLY_TIMEOUT": "REPLY_TIMEOUT",
               "ACCEPTED": "ACCEPTED", "PENDING_SUFFIX": "PENDING_SUFFIX"}
ERROR_CODES = ("INCOMPATIBLE_VERSION", "CONTAINER_UNKNOWN", "INVALID_ENV", "IO_FAILURE", "DECODE_FAILURE",
               "INVALID_CONFIG", "TRY_AGAIN_LATER", "NOT_AVAILABLE")


def c_defines() -> dict[str, int | str]:
    """#define NAME <integer> and #define NAME "<string>" of the C source (comments ignored)."""
    found: dict[str, int | str] = {}
    for match in re.finditer(r'^#define\s+([A-Z_]+)\s+(\d+|"[^"\\]*")\s*(?:/\*.*)?$', C_SOURCE.read_text(), re.M):
        name, value = match.groups()
        found[name] = value.strip('"') if value.startswith('"') else int(value)
    return found


def c_supported_versions() -> list[str]:
    match = re.search(r"SUPPORTED\[\]\s*=\s*\{([^}]*)\}", C_SOURCE.read_text())
    assert match, "no SUPPORTED[] array in felixpy-cni.c"
    return re.findall(r'"([^"]*)"', match.group(1))


def test_c_supported_versions_equal_pythons() -> None:
    assert c_supported_versions() == list(plugin.SUPPORTED_VERSIONS)


def test_c_constants_equal_pythons() -> None:
    defines = c_defines()
    for c_name, py_name in C_TO_PYTHON.items():
        assert defines.get(c_name) == getattr(plugin, py_name), c_name


def test_every_c_error_code_is_pythons() -> None:
    defines = c_defines()
    codes = {name: value for name, value in defines.items() if name in ERROR_CODES}
    assert set(codes) >= {"INCOMPATIBLE_VERSION", "INVALID_ENV", "IO_FAILURE", "DECODE_FAILURE",
                          "INVALID_CONFIG", "TRY_AGAIN_LATER"}  # the ones the shim answers with
    assert codes == {name: getattr(plugin, name) for name in codes}
    # Nothing else in the C source looks like an error code felixpy does not know.
    used = set(re.findall(r"emit_error\(\w+, ([A-Z_]+),", C_SOURCE.read_text()))
    assert used <= set(codes)


def literals_outside_constants(text: str) -> list[str]:
    """CNI versions and error codes spelled out in C code rather than through the constants."""
    body = re.sub(r"^#define .*$", "", text, flags=re.M)
    body = re.sub(r"SUPPORTED\[\][^;]*;", "", body)
    versions = [v for v in plugin.SUPPORTED_VERSIONS if f'"{v}' in body]
    return versions + re.findall(r'\\"code\\": \d+', body)


def test_c_source_spells_no_code_or_version_as_a_literal() -> None:
    assert literals_outside_constants(C_SOURCE.read_text()) == []
    # What the check catches: the out-of-memory answer as it was once written.
    assert literals_outside_constants('"{\\"cniVersion\\": \\"1.0.0\\", \\"code\\": 5}"') == [
        "1.0.0", '\\"code\\": 5']


def test_the_agent_side_uses_plugins_constants() -> None:
    # server.py imports them; no second definition anywhere in felixpy.
    for name in (*ERROR_CODES, "SUPPORTED_VERSIONS", "DEFAULT_VERSION"):
        assert getattr(server, name, getattr(plugin, name)) is getattr(plugin, name)
    defined_elsewhere = []
    for path in sorted((ROOT / "felixpy").rglob("*.py")):
        if path == ROOT / "felixpy" / "cni" / "plugin.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id in (*ERROR_CODES, "SUPPORTED_VERSIONS"):
                        defined_elsewhere.append(f"{path.relative_to(ROOT)}: {target.id}")
    assert defined_elsewhere == []
