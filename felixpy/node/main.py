"""felixpy-node: the per-node agent's entry point (what calico-node is in Calico).

Order: configuration from the environment (a bad value stops here with one line) → datastore →
startup (node name, node IP, default pools and configuration, FelixConfiguration merged in) → the
agent loop. The CNI socket opens after the first successful dataplane apply, so kubelet's first
pod never races the agent.

Configuration changes: when FelixConfiguration `default` or `node.<name>` changes a parameter
(node/config_watch.py), the agent stops, leaving the dataplane as it is, and felixpy-node starts
itself afresh with exec (same pid, new process image), which is what Felix's supervisor does
after Felix exits for a config change: neither the lab nor a container without an init system
has a supervisor that would restart it at once (kubelet backs a restarted container off by 10 s
and more). As Felix, a process that had run less than RESTART_GUARD seconds waits 2 s first, so
a configuration that keeps changing cannot spin.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

from felixpy import __version__

STARTED = time.monotonic()
RESTART_GUARD = 10.0  # seconds: a younger process waits before restarting (Felix sleeps 2 s)


def fail(message: str) -> int:
    sys.stderr.write(f"felixpy-node: {message}\n")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-v", "--version", "version"):
        print(f"felixpy-node {__version__}")
        return 0

    from felixpy.config import ConfigError, load_config

    try:
        config = load_config(os.environ)
    except ConfigError as err:
        return fail(str(err))
    try:
        _setup_logging(config)
    except OSError as err:
        return fail(f"FELIX_LOGFILEPATH: {err.strerror or err}")
    log = logging.getLogger("felixpy.node")

    from felixpy.node.health import HealthServer

    # Early, so that liveness answers while startup waits for the datastore.
    health = None
    if config.felix.health_enabled:
        health = HealthServer(config.felix.health_host, config.felix.health_port)
        try:
            health.start()
        except OSError as err:
            return fail(str(err))

    from felixpy.datastore.api import Unavailable
    from felixpy.datastore.factory import DatastoreConfigError, open_datastore

    try:
        store = open_datastore(os.environ)
    except DatastoreConfigError as err:
        return fail(str(err))

    from felixpy.node.startup import StartupError, startup

    deadline = time.monotonic() + 300
    while True:
        try:
            result = startup(store, config)
            break
        except StartupError as err:
            return fail(str(err))
        except Unavailable as err:
            # WAIT_FOR_DATASTORE semantics: keep trying while the datastore is unreachable.
            if not config.datastore.wait_for_datastore and time.monotonic() > deadline:
                return fail(f"datastore unreachable: {err}")
            log.warning("datastore not reachable during startup, retrying: %s", err)
            time.sleep(2)

    if result.config is not None and result.config != config:
        # FelixConfiguration default / node.<name> merged in: logging and health as configured.
        previous, config = config, result.config
        if _logging_settings(config) != _logging_settings(previous):
            try:
                _setup_logging(config)
            except OSError as err:
                return fail(f"logFilePath: {err.strerror or err}")
        if _health_settings(config) != _health_settings(previous):
            if health is not None:
                health.stop()
            health = None
            if config.felix.health_enabled:
                health = HealthServer(config.felix.health_host, config.felix.health_port)
                try:
                    health.start()
                except OSError as err:
                    return fail(str(err))

    from felixpy.node.reflector import reflector_mode

    if reflector_mode(os.environ):
        return run_route_reflector(config, store, result, health)
    rc = run_agent(config, store, result, health)
    if rc == RESTART:
        restart_process()
    return rc


RESTART = -1  # run_agent's answer when the configuration changed


def _logging_settings(config: Any) -> tuple[Any, ...]:
    f = config.felix
    return f.log_severity_screen, f.log_file_path, f.log_severity_file, f.log_debug_filename_regex


def _health_settings(config: Any) -> tuple[Any, ...]:
    return config.felix.health_enabled, config.felix.health_host, config.felix.health_port


def _setup_logging(config: Any) -> None:
    from felixpy.logs import setup_logging

    setup_logging(config.felix.log_severity_screen, config.agent.log_format,
                  file_path=config.felix.log_file_path, file_level=config.felix.log_severity_file,
                  debug_file_regex=config.felix.log_debug_filename_regex)


def restart_process() -> None:
    """felixpy-node again, from the start, in this process (see the module docstring)."""
    log = logging.getLogger("felixpy.node")
    if time.monotonic() - STARTED < RESTART_GUARD:
        time.sleep(2.0)
    log.warning("restarting felixpy-node for the configuration change pid=%d", os.getpid())
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def run_route_reflector(config: Any, store: Any, result: Any, health: Any = None) -> int:
    """Route-reflector mode (FELIXPY_ROUTE_REFLECTOR=true): drive BIRD 2 instead of running the agent."""
    import threading

    from felixpy.node.reflector import ReflectorPaths, run_reflector

    log = logging.getLogger("felixpy.node")
    try:
        paths = ReflectorPaths.from_env(os.environ, config.agent.state_dir)
    except ValueError as err:
        return fail(str(err))
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s received: stopping (BIRD keeps running)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from felixpy.node.bgp import bgp_readiness, read_status

    def status() -> Any:
        return read_status(paths.status)

    from felixpy.node.health import HealthServer

    # The checks exist for the metrics (felixpy_agent_ready) even when nothing serves /readiness.
    checks = health if health is not None else HealthServer()
    started = time.monotonic()
    # Calico's --bird-ready for the reflector's own BIRD sessions, from its status file.
    checks.add_readiness("bgp", lambda: bgp_readiness(status(), uptime=time.monotonic() - started))
    metrics_server = None
    if config.felix.prometheus_metrics_enabled:
        from felixpy.node.metrics import reflector_registry

        try:
            metrics_server = reflector_registry(result.node_name, status, checks).start_http(
                config.felix.prometheus_metrics_port, config.felix.prometheus_metrics_host)
        except OSError as err:
            return fail(f"metrics port {config.felix.prometheus_metrics_port}: {err}")
    log.info("felixpy-node %s node=%s ip=%s mode=route-reflector", __version__, result.node_name, result.ipv4)
    try:
        from felixpy.kernel.routeview import main_table_routes

        run_reflector(store, result.node_name, paths, stop, kernel_routes=main_table_routes)
    finally:
        if metrics_server is not None:
            metrics_server.stop()
        if health is not None:
            health.stop()
        store.close()
    return 0


def render_config(config: Any) -> Any:
    """The policy renderer's settings from the agent configuration."""
    from policy.render import RenderConfig

    return RenderConfig(
        iface_prefix=config.felix.interface_prefixes[0],
        default_endpoint_to_host_action=config.felix.default_endpoint_to_host_action,
        failsafe_inbound=config.felix.failsafe_inbound,
        failsafe_outbound=config.felix.failsafe_outbound,
        vxlan_port=config.felix.vxlan_port,  # encapsulation between nodes passes host endpoint policy
    )


def ipv6_refusal(config: Any) -> str | None:
    """Why pods on this node cannot get IPv6 addresses, or None when they can."""
    if not config.felix.ipv6_support:
        return "FELIX_IPV6SUPPORT (ipv6Support) is false on this node, so IPv6 is not programmed"
    return None


def run_agent(config: Any, store: Any, result: Any, health: Any = None) -> int:
    from felixpy.cni.server import CNIHandler, CNIServer
    from felixpy.kernel import commands, sysctl
    from felixpy.node.agent import Agent
    from felixpy.node.health import HealthServer, add_agent_checks
    from felixpy.node.metrics import Metrics

    log = logging.getLogger("felixpy.node")
    sysctl.write("net.ipv4.ip_forward", 1)
    if config.felix.ipv6_support and os.path.exists("/proc/sys/net/ipv6"):
        # IPv6 pods' traffic is forwarded like IPv4's (Felix with Ipv6Support sets both).
        sysctl.write("net/ipv6/conf/all/forwarding", 1)
    backend = config.node.networking_backend
    iptables_backend = config.felix.iptables_backend
    bgp = None
    bgp_status = None
    if backend == "bird":
        from felixpy.kernel.routeview import main_table_routes
        from felixpy.node.bgp import BGPController, BGPPaths, read_status
        from felixpy.node.reflector import ReflectorPaths

        try:
            paths = BGPPaths.from_env(os.environ, config.agent.state_dir)
            # Used when this node's Node gets a routeReflectorClusterID (BIRD speaks for it then).
            bird_paths = ReflectorPaths.from_env(os.environ, config.agent.state_dir)
        except ValueError as err:
            return fail(str(err))
        bgp = BGPController(result.node_name, paths, bird_paths=bird_paths, status_store=store,
                            kernel_routes=main_table_routes)
        bgp_status = lambda: read_status(paths.status)  # noqa: E731 - read at scrape time
    # The checks exist for the metrics (felixpy_agent_ready) even when nothing serves /readiness.
    checks = health
    if checks is None and config.felix.prometheus_metrics_enabled:
        checks = HealthServer()
    metrics = Metrics(host=result.node_name, bgp_status=bgp_status, health=checks)
    # iptables-restore / ipset calls and errors, counted where every command runs.
    commands.add_observer(metrics.observe_command)
    from felixpy.dataplane.managers.masq import NatSettings
    from felixpy.node.config_watch import ConfigWatch

    def on_restart(_changes: Any) -> None:
        agent.stop()  # the loop returns; run_agent answers RESTART once everything is shut

    # Startup waited until the datastore was unlocked; the watch follows ClusterInformation from here.
    watch = ConfigWatch(node_name=result.node_name, env=config.raw, running=config.felix,
                        felix_global=result.felix_global, felix_host=result.felix_host, ready=True,
                        on_restart=on_restart)
    agent = Agent(
        store=store,
        node_name=result.node_name,
        networking_backend=backend,
        route_refresh_interval=config.felix.route_refresh_interval,
        iptables_refresh_interval=config.felix.iptables_refresh_interval,
        ipsets_refresh_interval=config.felix.ipsets_refresh_interval,
        iptables_backend=None if iptables_backend == "auto" else iptables_backend,
        chain_insert_mode=config.felix.chain_insert_mode,
        nat_settings=NatSettings(config.felix.nat_outgoing_address, config.felix.nat_port_range),
        render_config=render_config(config),
        metrics=metrics,
        bgp=bgp,
        vxlan_mtu=config.felix.vxlan_mtu,
        ipip_mtu=config.felix.ipip_mtu,
        vxlan_vni=config.felix.vxlan_vni,
        vxlan_port=config.felix.vxlan_port,
        config_watch=watch,
        ipv6=config.felix.ipv6_support,
        vxlan_mtu_v6=config.felix.vxlan_mtu_v6,
    )
    probe = add_agent_checks(checks, agent.status, store=store) if checks is not None else None
    if checks is not None and bgp is not None:
        from felixpy.node.bgp import bgp_readiness

        started = time.monotonic()
        status_path = bgp.paths.status
        # Reads the status file the controller writes: the controller itself belongs to the loop.
        checks.add_readiness("bgp", lambda: bgp_readiness(read_status(status_path),
                                                         uptime=time.monotonic() - started))
    metrics_server = None
    if config.felix.prometheus_metrics_enabled:
        try:
            metrics_server = metrics.start_http(config.felix.prometheus_metrics_port,
                                                config.felix.prometheus_metrics_host)
        except OSError as err:
            return fail(f"metrics port {config.felix.prometheus_metrics_port}: {err}")

    def ready() -> tuple[bool, str]:
        if not agent.status.in_sync:
            return False, "not in sync with the datastore"
        if not agent.status.last_apply_ok:
            return False, f"last dataplane apply failed: {agent.status.last_apply_error}"
        return True, ""

    from felixpy.cni.ipam_request import kube_pod_annotations
    from felixpy.node.k8s_node import kube_api_configured, open_kube_http

    handler = CNIHandler(
        store=store,
        node_name=result.node_name,
        mtu=result.mtu,
        node_labels=lambda: agent.status.node_labels,
        wait_programmed=agent.waiter.wait,
        ready=ready,
        adopt_routes=agent.adopt_routes,
        iface_prefix=config.felix.interface_prefixes[0],
        observe=metrics.observe_cni,
        datastore_ready=lambda: watch.datastore_ready,
        # Pod annotations (ipAddrs, ipv4pools) come from the Kubernetes API when there is one,
        # unless the container runtime passes them with the request.
        pod_annotations=(kube_pod_annotations(lambda: open_kube_http(os.environ))
                         if kube_api_configured(os.environ) else None),
        ipv6_refusal=ipv6_refusal(config),
    )
    server = CNIServer(config.agent.cni_socket, handler)
    # Like calico-node: once the first dataplane apply is done (with BGP, only after the sidecar's
    # replay), pods may be plumbed and the Kubernetes Node's NetworkUnavailable condition cleared
    # (a no-op without a Kubernetes API; retried in the background on failure).
    from felixpy.node.k8s_node import NetworkUnavailableClearer

    network_ready = NetworkUnavailableClearer(result.node_name, os.environ)

    def on_first_apply() -> None:
        metrics.first_apply_done()
        server.start()
        network_ready.start()

    agent.on_first_apply = on_first_apply

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s received: stopping (dataplane is left as it is)", signal.Signals(signum).name)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("felixpy-node %s node=%s ip=%s backend=%s mtu=%d", __version__, result.node_name,
             result.ipv4, backend, result.mtu)
    try:
        agent.run()
    finally:
        server.stop()
        network_ready.stop()
        if probe is not None:
            probe.stop()
        if health is not None:
            health.stop()
        if metrics_server is not None:
            metrics_server.stop()
        store.close()
    return RESTART if watch.restart_requested else 0


if __name__ == "__main__":
    sys.exit(main())
