"""Install the CNI plugin and its network configuration on a node (`felixpy-install-cni`).

Two forms of the plugin exist:

* the static C shim (cni-shim/felixpy-cni.c), which the container image carries at
  /opt/felixpy/cni/felixpy-cni. `main()` — the install-cni init container, like Calico's
  `calico component cni install` (calico-reference §6.5) — copies it to the host's CNI bin
  directory and writes the conflist. The host needs no Python: the node image is not ours.
* the stdlib-only Python plugin run with `python -I -S` (`install_plugin`), for hosts that do
  have felixpy installed: the lab and the benchmarks. kubelet starts the plugin once per pod, so
  start-up time counts: the console script `felixpy-cni` goes through site-packages (≈ 35 ms
  here); `-I -S` starts in ≈ 20 ms because plugin.py needs nothing outside the standard library.

Environment of `main()` (names and defaults are Calico's where Calico has one):

  CNI_NET_DIR           /host/etc/cni/net.d       where the conflist goes
  CNI_BIN_DIR           /host/opt/cni/bin         where the plugin executable goes
  CNI_CONF_NAME         10-felixpy.conflist
  CNI_NETWORK_CONFIG    the conflist template (JSON with the placeholders below); when unset,
                        CNI_NETWORK_CONFIG_FILE names a file holding it, else DEFAULT_TEMPLATE
  CNI_MTU               0 (the agent's MTU; Calico's default 1500 predates its mtu file)
  KUBERNETES_NODE_NAME  substituted for __KUBERNETES_NODE_NAME__
  FELIXPY_CNI_SOCKET    substituted for __AGENT_SOCKET__ (the agent reads the same variable)
  SKIP_CNI_BINARIES     comma-separated executables not to install (e.g. "felixpy")
  UPDATE_CNI_BINARIES   true: replace an installed executable; false: keep it
  FELIXPY_CNI_SHIM      /opt/felixpy/cni/felixpy-cni, the executable to install as `felixpy`
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from felixpy.cni import plugin
from felixpy.kernel import commands

log = logging.getLogger(__name__)

PLUGIN_NAME = "felixpy"  # the conflist's "type", so kubelet runs CNI_BIN_DIR/felixpy
DEFAULT_SHIM = "/opt/felixpy/cni/felixpy-cni"
DEFAULT_AGENT_SOCKET = plugin.DEFAULT_SOCKET
VERIFY_TIMEOUT = 10.0

# Every variable main() reads (the manifest test checks install-cni's env against this).
ENV_VARIABLES = frozenset({
    "CNI_NET_DIR", "CNI_BIN_DIR", "CNI_CONF_NAME", "CNI_NETWORK_CONFIG", "CNI_NETWORK_CONFIG_FILE", "CNI_MTU",
    "KUBERNETES_NODE_NAME", "FELIXPY_CNI_SOCKET", "SKIP_CNI_BINARIES", "UPDATE_CNI_BINARIES", "FELIXPY_CNI_SHIM",
})

# Our plugin chained with the standard portmap plugin for hostPorts, as Calico's conflist does.
DEFAULT_TEMPLATE = """{
  "name": "k8s-pod-network",
  "cniVersion": "1.0.0",
  "plugins": [
    {"type": "felixpy", "agent_socket": "__AGENT_SOCKET__", "mtu": __CNI_MTU__},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
  ]
}"""


class InstallError(Exception):
    """install-cni cannot go on; str() is one line for the operator."""


# --------------------------------------------------------------------------------------------
# The lean Python plugin (hosts with felixpy installed)
# --------------------------------------------------------------------------------------------


def plugin_source(python: str = sys.executable) -> str:
    body = Path(plugin.__file__).read_text()
    return f"#!{python} -IS\n{body}"


def install_plugin(bin_dir: str, name: str = PLUGIN_NAME, python: str = sys.executable) -> str:
    """Write the Python plugin to bin_dir/name atomically (mode 0755) and return its path."""
    os.makedirs(bin_dir, exist_ok=True)
    return _write_atomically(os.path.join(bin_dir, name), plugin_source(python).encode(), 0o755)


# --------------------------------------------------------------------------------------------
# install-cni
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstallSettings:
    net_dir: str
    bin_dir: str
    conf_name: str
    template: str
    mtu: int
    node_name: str
    agent_socket: str
    skip_binaries: frozenset[str]
    update_binaries: bool
    shim: str


@dataclass(frozen=True, slots=True)
class InstallResult:
    conflist_path: str
    binary_path: str | None  # None when skipped or kept
    conflist: Mapping[str, Any]


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "y", "t"):
        return True
    if lowered in ("false", "0", "no", "n", "f"):
        return False
    raise InstallError(f"{name}={value!r}: accepted values are true, false")


def settings_from_env(env: Mapping[str, str]) -> InstallSettings:
    """Read install-cni's environment; raises InstallError naming the variable."""
    template = env.get("CNI_NETWORK_CONFIG", "")
    if not template.strip():
        template_file = env.get("CNI_NETWORK_CONFIG_FILE", "")
        if template_file:
            try:
                template = Path(template_file).read_text()
            except OSError as err:
                raise InstallError(f"CNI_NETWORK_CONFIG_FILE={template_file!r}: {err.strerror}") from None
        else:
            template = DEFAULT_TEMPLATE
    mtu_text = env.get("CNI_MTU", "").strip() or "0"
    try:
        mtu = int(mtu_text)
    except ValueError:
        mtu = -1
    if mtu != 0 and not 68 <= mtu <= 65535:
        raise InstallError(f"CNI_MTU={mtu_text!r}: expected 0 (the agent's MTU) or an MTU from 68 to 65535")
    agent_socket = env.get("FELIXPY_CNI_SOCKET", "").strip() or DEFAULT_AGENT_SOCKET
    if not agent_socket.startswith("/"):
        raise InstallError(f"FELIXPY_CNI_SOCKET={agent_socket!r}: expected an absolute path")
    conf_name = env.get("CNI_CONF_NAME", "").strip() or "10-felixpy.conflist"
    if "/" in conf_name or not conf_name.endswith(".conflist"):
        raise InstallError(f"CNI_CONF_NAME={conf_name!r}: expected a file name ending in .conflist")
    return InstallSettings(
        net_dir=env.get("CNI_NET_DIR", "").strip() or "/host/etc/cni/net.d",
        bin_dir=env.get("CNI_BIN_DIR", "").strip() or "/host/opt/cni/bin",
        conf_name=conf_name,
        template=template,
        mtu=mtu,
        node_name=env.get("KUBERNETES_NODE_NAME", "").strip(),
        agent_socket=agent_socket,
        skip_binaries=frozenset(b.strip() for b in env.get("SKIP_CNI_BINARIES", "").split(",") if b.strip()),
        update_binaries=_bool("UPDATE_CNI_BINARIES", env.get("UPDATE_CNI_BINARIES", "") or "true"),
        shim=env.get("FELIXPY_CNI_SHIM", "").strip() or DEFAULT_SHIM,
    )


def _json_text(value: str) -> str:
    """value escaped for use inside a JSON string literal (the template has the quotes)."""
    return json.dumps(value)[1:-1]


def render_network_config(template: str, *, mtu: int, node_name: str, agent_socket: str) -> dict[str, Any]:
    """Substitute the placeholders, parse and validate; returns the conflist object."""
    if "__KUBERNETES_NODE_NAME__" in template and not node_name:
        raise InstallError("the network config uses __KUBERNETES_NODE_NAME__ but KUBERNETES_NODE_NAME is not set")
    text = (template.replace("__CNI_MTU__", str(mtu))
            .replace("__KUBERNETES_NODE_NAME__", _json_text(node_name))
            .replace("__AGENT_SOCKET__", _json_text(agent_socket)))
    try:
        conflist = json.loads(text)
    except ValueError as err:
        raise InstallError(f"the network config is not valid JSON after substitution: {err}") from None
    validate_conflist(conflist)
    return conflist  # type: ignore[no-any-return]


def validate_conflist(conflist: Any) -> None:
    """Check what kubelet's libcni requires of a conflist, plus that it runs our plugin."""
    if not isinstance(conflist, dict):
        raise InstallError("the network config must be a JSON object")
    name = conflist.get("name")
    if not isinstance(name, str) or not name:
        raise InstallError('the network config needs a non-empty string "name"')
    version = conflist.get("cniVersion")
    if version not in plugin.SUPPORTED_VERSIONS:
        raise InstallError(f"the network config's cniVersion {version!r} is not one of "
                           + ", ".join(plugin.SUPPORTED_VERSIONS))
    plugins = conflist.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise InstallError('the network config needs a non-empty "plugins" list (it is a conflist)')
    for index, entry in enumerate(plugins):
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str) or not entry["type"]:
            raise InstallError(f'plugins[{index}] needs a non-empty string "type"')
    if not any(entry["type"] == PLUGIN_NAME for entry in plugins):
        raise InstallError(f'no plugin in the network config has "type": "{PLUGIN_NAME}"')


def _write_atomically(dest: str, data: bytes, mode: int) -> str:
    """Write dest through a temporary file in its directory, so a reader sees old or new, never half."""
    directory, base = os.path.split(dest)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


def verify_plugin(path: str) -> None:
    """Run the installed plugin as kubelet would for VERSION, with nothing else in its environment."""
    try:
        out = commands.run(["env", "-i", "CNI_COMMAND=VERSION", path], input='{"cniVersion": "1.0.0"}',
                           timeout=VERIFY_TIMEOUT)
    except commands.CommandFailed as err:
        raise InstallError(f"installed plugin {path} failed VERSION: {err}") from None
    try:
        answer = json.loads(out.stdout)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "1.0.0" not in answer.get("supportedVersions", []):
        raise InstallError(f"installed plugin {path} answered VERSION with {out.stdout[:200]!r}")


def install_binary(src: str, bin_dir: str, name: str = PLUGIN_NAME, update: bool = True) -> str | None:
    """Copy src to bin_dir/name atomically (0755) and verify it; None if kept (update=False)."""
    dest = os.path.join(bin_dir, name)
    if not update and os.path.exists(dest):
        log.info("keeping installed binary path=%s reason=UPDATE_CNI_BINARIES=false", dest)
        return None
    if not os.path.isfile(src):
        raise InstallError(f"the plugin executable {src} is missing from the image (FELIXPY_CNI_SHIM)")
    os.makedirs(bin_dir, exist_ok=True)
    with open(src, "rb") as f:
        data = f.read()
    _write_atomically(dest, data, 0o755)
    verify_plugin(dest)
    log.info("installed binary path=%s bytes=%d", dest, len(data))
    return dest


def install(settings: InstallSettings) -> InstallResult:
    """Install the executable, then the conflist (kubelet treats the conflist as "CNI ready")."""
    conflist = render_network_config(settings.template, mtu=settings.mtu, node_name=settings.node_name,
                                     agent_socket=settings.agent_socket)
    binary = None
    if PLUGIN_NAME in settings.skip_binaries:
        log.info("skipping binary name=%s reason=SKIP_CNI_BINARIES", PLUGIN_NAME)
    else:
        binary = install_binary(settings.shim, settings.bin_dir, PLUGIN_NAME, settings.update_binaries)
    for entry in conflist["plugins"]:
        chained = entry["type"]
        if chained != PLUGIN_NAME and not os.path.exists(os.path.join(settings.bin_dir, chained)):
            # The standard plugins come with the node (kubeadm's kubernetes-cni package); ours are
            # static, Debian's portmap is not, so the image does not carry a copy to install.
            log.warning("chained plugin missing name=%s dir=%s effect=pods_using_it_fail_to_start",
                        chained, settings.bin_dir)
    os.makedirs(settings.net_dir, exist_ok=True)
    path = _write_atomically(os.path.join(settings.net_dir, settings.conf_name),
                             (json.dumps(conflist, indent=2) + "\n").encode(), 0o600)
    log.info("wrote network config path=%s name=%s cniVersion=%s", path, conflist["name"], conflist["cniVersion"])
    return InstallResult(conflist_path=path, binary_path=binary, conflist=conflist)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """`felixpy-install-cni`: install from the environment; one line and exit 1 on failure."""
    del argv  # configured by environment only, like Calico's install-cni
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        install(settings_from_env(os.environ if env is None else env))
    except InstallError as err:
        print(f"felixpy-install-cni: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"felixpy-install-cni: {err.filename or ''}: {err.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
