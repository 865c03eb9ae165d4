"""`felixpy-lab chaos`: faults and churn on a running lab; exit 0 only if nothing was lost.

    felixpy-lab chaos [--minutes 3] [--seed S] [-o json] [--keep] [--name LAB]

It runs on a lab that is already up (whatever `up` built: mode, reflectors, datastore), so that one
command tortures every topology the lab can build. docs/lab.md describes the run and the verdict;
in short:

1. *Steady pods* in namespace `chaos-steady` (two per node, one per node beyond four nodes) run
   felixpy.lab.traffic: each keeps one long-lived TCP flow to every other steady pod and pings
   every other steady pod 5 times a second. No policy of the run selects them, so every one of
   their packets must arrive.
2. For `--minutes`, two threads with random generators seeded from `--seed`: *faults* (SIGKILL of
   an agent, an ExaBGP speaker, a reflector's BIRD, etcd; a stop of the kube-apiserver; a node's
   link cut on the fabric for a few seconds; each restored after 1-5 s, one at a time) and
   *churn* (pods added to and deleted from `chaos-churn`, pod and namespace labels changed,
   Kubernetes and Calico policies applied and deleted), all through the lab's own CLI.
3. Then everything is restored and checked: no duplicate IP was ever handed out (every ADD's result
   is tracked), `felixctl ipam check` is clean, the tcp/80 matrix of every pod equals what
   `felixctl policy explain` predicts, and every node's kernel tables are converged (restarting its
   agent, which programs from scratch, changes no route, rule, ipset or tunnel entry).

The tolerance: a ping may be lost only when it was sent while the node of its source or of its
destination had its link cut (from half a second before the cut until LINK_GRACE after the link
came back) and the two pods are on different nodes. Nothing else may be lost: no flow may break,
no other ping may go unanswered.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from felixpy.lab import pods, procs, state, topology
from felixpy.lab.state import LabState, PodState
from felixpy.lab.topology import LabUsageError

STEADY_NS = "chaos-steady"
CHURN_NS = "chaos-churn"
FLOW_PORT = 7000
MATRIX_PORT = 80
PING_INTERVAL = 0.2
FLOW_INTERVAL = 0.1
PING_WAIT = 2.0
# A ping sent from CUT_LEAD before a link cut until LINK_GRACE after the link is back may be lost
# (docs/lab.md): the cut itself, plus the neighbour entries the carrier loss flushed being resolved
# again. Measured after restoring: the last lost ping was sent at most ~0.1 s after the link came up.
CUT_LEAD = 0.5
LINK_GRACE = 2.0
MAX_CHURN_PODS = 12
CLI_TIMEOUT = 180.0  # one CLI call: a pod add may wait for its agent (60 s) and retry DEL
SETTLE_TIMEOUT = 120.0
DEL_RETRY_SECONDS = 120.0
LABELS = ("web", "db", "cache")

# The run's policies: they select only pods of chaos-churn, so the steady pods are never isolated.
POLICIES: dict[str, str] = {
    "k8s-db-from-web": f"""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: chaos-db-from-web, namespace: {CHURN_NS}}}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: web}}}}}}]
    ports: [{{port: {MATRIX_PORT}, protocol: TCP}}]
""",
    "k8s-cache-isolated": f"""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: chaos-cache-isolated, namespace: {CHURN_NS}}}
spec:
  podSelector: {{matchLabels: {{app: cache}}}}
  policyTypes: [Ingress]
""",
    "k8s-web-from-phase-a": f"""apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: chaos-web-from-phase-a, namespace: {CHURN_NS}}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{chaos-phase: a}}}}}}]
""",
    "calico-web-not-to-cache": f"""apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: chaos-web-not-to-cache, namespace: {CHURN_NS}}}
spec:
  selector: app == 'web'
  order: 100
  types: [Egress]
  egress:
  - action: Deny
    destination: {{selector: app == 'cache'}}
  - action: Allow
""",
    "gnp-db-not-from-steady": f"""apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: chaos-db-not-from-steady}}
spec:
  selector: projectcalico.org/namespace == '{CHURN_NS}' && app == 'db'
  order: 50
  types: [Ingress]
  ingress:
  - action: Deny
    source: {{selector: projectcalico.org/namespace == '{STEADY_NS}'}}
  - action: Pass
""",
}


@dataclass(frozen=True, slots=True)
class Window:
    """A deliberate fault: what, on which target, from when to when (CLOCK_MONOTONIC)."""

    kind: str
    target: str
    start: float
    end: float


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0


@dataclass
class Report:
    lab: str
    seed: int
    minutes: float
    mode: str
    datastore: str
    nodes: list[str]
    reflectors: list[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    windows: list[Window] = field(default_factory=list)
    churn: dict[str, Tally] = field(default_factory=dict)
    flows: list[dict[str, Any]] = field(default_factory=list)
    pings: dict[str, Any] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    ips_handed_out: int = 0
    ipam_check: dict[str, list[str]] = field(default_factory=dict)
    matrix: dict[str, Any] = field(default_factory=dict)
    converged: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # why the run failed, one line each

    def to_json(self) -> dict[str, Any]:
        kept = sum(1 for f in self.flows if f.get("broken") is None and f.get("connected"))
        return {
            "lab": self.lab, "seed": self.seed, "minutes": self.minutes, "mode": self.mode,
            "datastore": self.datastore, "nodes": self.nodes, "routeReflectors": self.reflectors,
            "faults": dict(sorted(self.faults.items())), "faultsTotal": sum(self.faults.values()),
            "churn": {k: {"ok": v.ok, "failed": v.failed} for k, v in sorted(self.churn.items())},
            "flows": {"total": len(self.flows), "kept": kept,
                      "maxStallSeconds": max((f.get("maxStall", 0.0) for f in self.flows), default=0.0),
                      "broken": [f for f in self.flows if f.get("broken") is not None or not f.get("connected")]},
            "pings": self.pings,
            "ipsHandedOut": self.ips_handed_out,
            "duplicates": self.duplicates,
            "ipamCheck": self.ipam_check,
            "matrix": self.matrix,
            "converged": self.converged,
            "events": self.events,
            "result": "pass" if not self.problems else "fail",
            "problems": self.problems,
        }


class Chaos:
    """One chaos run on one lab. Threads: faults, churn."""

    def __init__(self, lab: str, minutes: float, seed: int, *, keep: bool = False,
                 say: Callable[[str], None] = print) -> None:
        self.lab = lab
        self.minutes = minutes
        self.seed = seed
        self.keep = keep
        self._say = say
        st = state.load(lab)
        if st.phase != "up":
            raise LabUsageError(f"lab {lab} is not up yet (phase {st.phase})")
        self.mode = st.mode
        self.datastore = st.datastore
        self.nodes = [n.name for n in st.nodes if not n.route_reflector]
        self.reflectors = [n.name for n in st.nodes if n.route_reflector]
        self.report = Report(lab=lab, seed=seed, minutes=minutes, mode=st.mode, datastore=st.datastore,
                             nodes=self.nodes, reflectors=self.reflectors)
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._busy: set[str] = set()  # components down right now: "agent:n1", "link:n2", "etcd", ...
        self._traffic: dict[str, subprocess.Popen[str]] = {}
        self._holders: dict[str, str] = {}  # IP -> pod that holds it, from every ADD's result
        self._churn_counter = 0
        self._applied: set[str] = set()

    # -- output -------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def event(self, kind: str, text: str) -> None:
        at = self._elapsed()
        with self._lock:
            self.report.events.append({"at": round(at, 2), "kind": kind, "text": text})
        self._say(f"{at:7.1f}s  {text}")

    def problem(self, text: str) -> None:
        with self._lock:
            self.report.problems.append(text)
        self.event("problem", f"PROBLEM: {text}")

    # -- the lab's CLI, as a user runs it -------------------------------------------------------
    def cli(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "felixpy.lab.cli", *args, "--name", self.lab]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, procs.LAB_ENV: self.lab})
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", f"no answer within {timeout:g} s")

    def must(self, *args: str, timeout: float = CLI_TIMEOUT) -> str:
        done = self.cli(*args, timeout=timeout)
        if done.returncode != 0:
            raise LabUsageError(f"chaos: felixpy-lab {' '.join(args)}: {_last_line(done)}")
        return done.stdout

    def state(self) -> LabState:
        return state.load(self.lab)

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> Report:
        self._check_clean()
        try:
            self._setup()
            self.event("phase", f"faults and churn for {self.minutes:g} min (seed {self.seed})")
            deadline = time.monotonic() + self.minutes * 60
            threads = [threading.Thread(target=self._guard, args=(self._fault_loop, deadline), name="chaos-faults"),
                       threading.Thread(target=self._guard, args=(self._churn_loop, deadline), name="chaos-churn")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.event("phase", "faults over: restoring and checking")
            self._restore_everything()
            self._settle()
            self._cleanup_pods_without_ip()
            self._check_ipam("withPods")
            self._check_matrix()
            self._check_converged()
        finally:
            self._stop.set()
            self._restore_everything(quiet=True)
            self._finish_traffic()
            if not self.keep:
                self._cleanup()
        if not self.keep:
            self._check_ipam("afterCleanup")
        self._verdict()
        return self.report

    def _guard(self, loop: Callable[[float], None], deadline: float) -> None:
        try:
            loop(deadline)
        except Exception as e:  # a bug of the driver must show, not end the run silently
            self.problem(f"{threading.current_thread().name} stopped: {type(e).__name__}: {e}")

    def _check_clean(self) -> None:
        st = self.state()
        left = [p.ref for p in st.pods if p.namespace in (STEADY_NS, CHURN_NS)]
        if left:
            raise LabUsageError(f"lab {self.lab} still has pods of an earlier chaos run ({', '.join(left[:3])}"
                                f"{', ...' if len(left) > 3 else ''}): delete them or use a fresh lab")
        for node in st.nodes:
            if not procs.alive(node.agent_pid):
                raise LabUsageError(f"{node.name}: agent not running (felixpy-lab agent start {node.name})")

    # -- setup: steady pods and their traffic -------------------------------------------------
    def _steady_pods(self) -> list[tuple[str, str]]:
        per_node = 2 if len(self.nodes) <= 4 else 1
        return [(f"s-{node}-{i}", node) for node in self.nodes for i in range(per_node)]

    def _setup(self) -> None:
        st = self.state()
        for pod in st.pods:
            for ip in pod.ips:
                self._holders[ip] = pod.ref
        self.must("ns", "add", STEADY_NS, "--labels", "chaos=steady")
        self.must("ns", "add", CHURN_NS, "--labels", "chaos=churn,chaos-phase=a")
        for name, node in self._steady_pods():
            self._add_pod(f"{STEADY_NS}/{name}", node, "role=steady", steady=True)
        steady = [p for p in self.state().pods if p.namespace == STEADY_NS]
        self._check_steady_unisolated(steady)
        self._wait_steady_connected(steady)
        for pod in steady:
            others = [o for o in steady if o is not pod]
            argv = ["ip", "netns", "exec", pod.netns, sys.executable, "-m", "felixpy.lab.traffic",
                    "--lab", self.lab, "--pod", pod.ref, "--listen", str(FLOW_PORT),
                    "--ping-interval", str(PING_INTERVAL), "--flow-interval", str(FLOW_INTERVAL),
                    "--ping-wait", str(PING_WAIT), "--max-seconds", str(self.minutes * 60 + 1800)]
            for o in others:
                argv += ["--flow", f"{o.ips[0]}:{FLOW_PORT}", "--ping", o.ips[0]]
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env={**procs.base_env(), procs.LAB_ENV: self.lab},
                                    start_new_session=True)
            self._traffic[pod.ref] = proc
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise LabUsageError(f"chaos: traffic in {pod.ref} did not start: {_stderr(proc)}")
        self._wait_flow_ports(steady)
        for proc in self._traffic.values():
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        pairs = len(steady) * (len(steady) - 1)
        self.event("setup", f"{len(steady)} steady pods on {len(self.nodes)} nodes: {pairs} TCP flows, "
                            f"{pairs} ping pairs at {1 / PING_INTERVAL:g}/s")

    def _check_steady_unisolated(self, steady: list[PodState]) -> None:
        """The lab may carry the user's own policies: the run needs steady pods nothing isolates."""
        verdicts = self._predict(steady, steady, FLOW_PORT)
        blocked = [f"{s} -> {d}" for (s, d), ok in verdicts.items() if not ok]
        if blocked:
            raise LabUsageError(f"chaos: the lab's policies isolate the steady pods ({', '.join(blocked[:3])}); "
                                "run chaos on a lab without policies that select them")

    def _wait_steady_connected(self, steady: list[PodState]) -> None:
        """Every steady pod answers every other on tcp/80 before any traffic is counted."""
        def all_connected() -> bool:
            for src in steady:
                targets = [f"tcp:{d.ips[0]}:{MATRIX_PORT}" for d in steady if d is not src]
                if not all(_probe(self.lab, src, targets, 2.0)):
                    return False
            return True
        if not _wait(all_connected, SETTLE_TIMEOUT):
            raise LabUsageError(f"chaos: the steady pods do not reach each other within {SETTLE_TIMEOUT:g} s")

    def _wait_flow_ports(self, steady: list[PodState]) -> None:
        def listening() -> bool:
            return all(all(_probe(self.lab, src, [f"tcp:{d.ips[0]}:{FLOW_PORT}" for d in steady if d is not src], 2.0))
                       for src in steady)
        if not _wait(listening, 30.0):
            raise LabUsageError("chaos: the steady pods' traffic servers do not answer")

    # -- pods, with every ADD's result tracked --------------------------------------------------
    def _add_pod(self, ref: str, node: str, labels: str, steady: bool = False) -> bool:
        done = self.cli("pod", "add", ref, "--node", node, "--labels", labels, "--serve", f"tcp:{MATRIX_PORT}")
        if done.returncode != 0:
            if steady:
                raise LabUsageError(f"chaos: pod add {ref}: {_last_line(done)}")
            self._tally("pod-add", False)
            self.event("churn", f"pod add {ref} on {node} failed: {_last_line(done)}")
            return False
        ns, name = ref.split("/")
        pod = self.state().find_pod(ns, name)
        ips = list(pod.ips) if pod is not None else []
        with self._lock:
            self.report.ips_handed_out += len(ips)
            for ip in ips:
                holder = self._holders.get(ip)
                if holder is not None and holder != ref:
                    self.report.duplicates.append(f"{ip} handed to {ref} while {holder} holds it")
                self._holders[ip] = ref
        if not ips:
            self.problem(f"pod add {ref} succeeded without an IP")
        if not steady:
            self._tally("pod-add", True)
            self.event("churn", f"pod add {ref} on {node} ({labels}): {', '.join(ips) or 'no IP'}")
        return True

    def _del_pod(self, pod: PodState) -> bool:
        """A failed DEL is retried until it succeeds (up to DEL_RETRY_SECONDS), as kubelet does: a
        DEL cut short by an etcd kill may have released the address but not yet removed the
        endpoint and the veth, and the pod is not gone until a DEL has succeeded."""
        deadline = time.monotonic() + DEL_RETRY_SECONDS
        done = self.cli("pod", "del", pod.ref)
        while done.returncode != 0 and time.monotonic() < deadline:
            self.event("churn", f"pod del {pod.ref} failed, retrying: {_last_line(done)}")
            time.sleep(1.0)
            done = self.cli("pod", "del", pod.ref)
        ok = done.returncode == 0
        self._tally("pod-del", ok)
        if ok:
            with self._lock:
                for ip in pod.ips:
                    if self._holders.get(ip) == pod.ref:
                        del self._holders[ip]
        self.event("churn", f"pod del {pod.ref}" + ("" if ok else f" failed: {_last_line(done)}"))
        return ok

    def _tally(self, what: str, ok: bool) -> None:
        with self._lock:
            t = self.report.churn.setdefault(what, Tally())
            if ok:
                t.ok += 1
            else:
                t.failed += 1

    # -- churn --------------------------------------------------------------------------------
    def _churn_loop(self, deadline: float) -> None:
        rng = random.Random(f"{self.seed}/churn")
        while time.monotonic() < deadline and not self._stop.is_set():
            churn = [p for p in self.state().pods if p.namespace == CHURN_NS]
            choices: list[tuple[str, float]] = [("label-pod", 2.0), ("label-ns", 0.5), ("policy", 2.0)]
            if len(churn) < MAX_CHURN_PODS:
                choices.append(("add", 4.0 if len(churn) < MAX_CHURN_PODS // 2 else 2.0))
            if churn:
                choices.append(("del", 2.0 if len(churn) > MAX_CHURN_PODS // 2 else 1.0))
            what = rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]
            if what == "add":
                self._churn_counter += 1
                self._add_pod(f"{CHURN_NS}/c{self._churn_counter}", rng.choice(self.nodes),
                              f"app={rng.choice(LABELS)}")
            elif what == "del" and churn:
                self._del_pod(rng.choice(churn))
            elif what == "label-pod" and churn:
                pod = rng.choice(churn)
                app = rng.choice(LABELS)
                done = self.cli("label", "pod", pod.ref, f"app={app}")
                self._tally("label-pod", done.returncode == 0)
                self.event("churn", f"label pod {pod.ref} app={app}"
                                    + ("" if done.returncode == 0 else f" failed: {_last_line(done)}"))
            elif what == "label-ns":
                phase = rng.choice("ab")
                done = self.cli("label", "ns", CHURN_NS, f"chaos-phase={phase}")
                self._tally("label-ns", done.returncode == 0)
                self.event("churn", f"label ns {CHURN_NS} chaos-phase={phase}"
                                    + ("" if done.returncode == 0 else f" failed: {_last_line(done)}"))
            elif what == "policy":
                name = rng.choice(sorted(POLICIES))
                verb = "delete" if name in self._applied else "apply"
                done = self.cli(verb, "-f", self._policy_file(name))
                ok = done.returncode == 0
                self._tally(f"policy-{verb}", ok)
                if ok:
                    (self._applied.discard if verb == "delete" else self._applied.add)(name)
                self.event("churn", f"{verb} policy {name}" + ("" if ok else f" failed: {_last_line(done)}"))
            self._stop.wait(rng.uniform(0.2, 1.5))

    def _policy_file(self, name: str) -> str:
        d = f"{topology.run_dir(self.lab)}/chaos"
        os.makedirs(d, exist_ok=True)
        path = f"{d}/{name}.yaml"
        with open(path, "w") as f:
            f.write(POLICIES[name])
        return path

    # -- faults -------------------------------------------------------------------------------
    def _fault_kinds(self) -> list[tuple[str, list[str]]]:
        kinds: list[tuple[str, list[str]]] = [("agent-kill", self.nodes + self.reflectors)]
        if self.mode == "bgp":
            kinds.append(("exabgp-kill", self.nodes))
        if len(self.reflectors) >= 2:
            # One reflector at a time, and only with a second one: a lone reflector's BIRD going
            # away withdraws every route (no graceful restart between BIRD and ExaBGP here).
            kinds.append(("bird-kill", self.reflectors))
        if self.datastore == "kubernetes":
            kinds.append(("apiserver-stop", ["apiserver"]))
        else:
            kinds.append(("etcd-kill", ["etcd"]))
        kinds.append(("link-cut", self.nodes + self.reflectors))
        return kinds

    def _fault_loop(self, deadline: float) -> None:
        """One fault at a time, each restored before the next (1-3 s apart).

        A cluster is built to survive one failure, not all of them at once: two ExaBGPs and a
        reflector down together, or an agent and etcd, are outages by design, and counting their
        losses would measure the fault mix instead of felixpy. A first run with faults overlapping
        (several at once, restores queued behind pod adds waiting on a dead agent) lost 20 % of
        its pings. Churn goes on throughout, so every fault meets pod adds, deletes, label and
        policy changes."""
        rng = random.Random(f"{self.seed}/faults")
        kinds = self._fault_kinds()
        self._stop.wait(rng.uniform(1.0, 3.0))
        while time.monotonic() < deadline and not self._stop.is_set():
            kind, targets = rng.choice(kinds)
            target = rng.choice(targets)
            down = rng.uniform(2.0, 5.0) if kind == "link-cut" else rng.uniform(1.0, 5.0)
            key = self._busy_key(kind, target)
            with self._lock:
                self._busy.add(key)
            self._fault(kind, target, down, key)
            # A fault is over when the cluster is whole again: a second ExaBGP kill before the
            # first restart's sessions are back is a double failure graceful restart does not cover
            # (RFC 4724: the peer drops the stale routes), as the 30-minute run showed.
            if self.mode == "bgp" and not _wait(self._all_established, SETTLE_TIMEOUT, 0.5):
                self.problem(f"{kind} {target}: BGP sessions not all Established {SETTLE_TIMEOUT:g} s after the restore")
            self._stop.wait(rng.uniform(1.0, 3.0))

    @staticmethod
    def _busy_key(kind: str, target: str) -> str:
        return {"agent-kill": "agent", "exabgp-kill": "exabgp", "bird-kill": "bird",
                "link-cut": "link"}.get(kind, kind) + f":{target}"

    def _fault(self, kind: str, target: str, down: float, key: str) -> None:
        try:
            start = time.monotonic()
            self._inject(kind, target)
            self.event("fault", f"{kind} {target} (back in {down:.1f} s)")
            with self._lock:
                self.report.faults[kind] = self.report.faults.get(kind, 0) + 1
            time.sleep(down)
            self._recover(kind, target)
            end = time.monotonic()
            with self._lock:
                self.report.windows.append(Window(kind, target, start, end))
            self.event("restore", f"{kind} {target}: restored after {end - start:.1f} s")
        except Exception as e:
            self.problem(f"{kind} {target}: {type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._busy.discard(key)

    def _kill(self, pid: int, what: str) -> None:
        if pid <= 0 or pid not in procs.marked_pids(self.lab):
            raise LabUsageError(f"{what}: not running")
        os.kill(pid, signal.SIGKILL)
        if not _wait(lambda: not procs.alive(pid), 10.0, 0.02):
            raise LabUsageError(f"{what} (pid {pid}) survived SIGKILL")

    def _inject(self, kind: str, target: str) -> None:
        st = self.state()
        if kind == "agent-kill":
            self._kill(st.node(target).agent_pid, f"{target}'s agent")
        elif kind == "exabgp-kill":
            self._kill(st.node(target).exabgp_pid, f"{target}'s ExaBGP")
        elif kind == "bird-kill":
            self._kill(st.node(target).bird_pid, f"{target}'s BIRD")
        elif kind == "etcd-kill":
            self._kill(st.etcd_pid, "etcd")
        elif kind == "apiserver-stop":
            self.must("apiserver", "stop")
        elif kind == "link-cut":
            procs.ip(topology.fabric_netns(self.lab), "link", "set", target, "down")

    def _recover(self, kind: str, target: str) -> None:
        if kind == "agent-kill":
            self.must("agent", "start", target)
        elif kind in ("exabgp-kill", "bird-kill"):
            self.must("speaker", "start", target)
        elif kind == "etcd-kill":
            self._start_etcd()
        elif kind == "apiserver-stop":
            self.must("apiserver", "start")
        elif kind == "link-cut":
            procs.ip(topology.fabric_netns(self.lab), "link", "set", target, "up")

    def _start_etcd(self) -> None:
        with state.locked(self.lab):
            st = self.state()
            st.etcd_pid = procs.start_etcd(self.lab)
            state.save(st)
        pods.enter_fabric(self.lab)
        if not procs.wait_tcp(topology.FABRIC_IP, topology.ETCD_CLIENT_PORT, 30.0):
            raise LabUsageError(f"etcd did not come back; see {topology.run_dir(self.lab)}/etcd.log")

    def _restore_everything(self, quiet: bool = False) -> None:
        """Whatever a fault left down (a failed restore, an interrupted run) is brought back."""
        st = self.state()
        fabric = topology.fabric_netns(self.lab)
        for node in st.nodes:
            try:
                procs.ip(fabric, "link", "set", node.name, "up")
            except procs.LabCommandError as e:
                self._note(quiet, f"link {node.name} up: {e}")
        if st.datastore == "etcd" and not procs.alive(st.etcd_pid):
            self._try(quiet, "etcd start", self._start_etcd)
        if st.datastore == "kubernetes" and not procs.alive(st.kube_pids.get("kube-apiserver", 0)):
            self._try(quiet, "apiserver start", lambda: self.must("apiserver", "start"))
        for node in self.state().nodes:
            if node.route_reflector and not procs.alive(node.bird_pid):
                self._try(quiet, f"speaker start {node.name}", functools.partial(self.must, "speaker", "start", node.name))
            if st.mode == "bgp" and not node.route_reflector and not procs.alive(node.exabgp_pid):
                self._try(quiet, f"speaker start {node.name}", functools.partial(self.must, "speaker", "start", node.name))
            if not procs.alive(node.agent_pid):
                self._try(quiet, f"agent start {node.name}", functools.partial(self.must, "agent", "start", node.name))

    def _try(self, quiet: bool, what: str, action: Callable[[], Any]) -> None:
        try:
            action()
            if not quiet:
                self.problem(f"{what} was still needed after the faults stopped")
        except Exception as e:
            self._note(quiet, f"{what}: {e}")

    def _note(self, quiet: bool, text: str) -> None:
        if quiet:
            self._say(f"chaos: {text}")
        else:
            self.problem(text)

    # -- after the faults -----------------------------------------------------------------------
    def _all_established(self) -> bool:
        from felixpy.node.bgp import read_status

        for node in self.state().nodes:
            data = read_status(topology.bgp_status_file(self.lab, node.name)) or {}
            peers = data.get("peers", [])
            if not peers or any(p.get("state") != "Established" for p in peers):
                return False
        return True

    def _settle(self) -> None:
        """Every agent answers and, in mode bgp, every session is Established again."""
        if self.mode != "bgp":
            return
        if not _wait(self._all_established, SETTLE_TIMEOUT, 0.5):
            self.problem(f"BGP sessions not all Established {SETTLE_TIMEOUT:g} s after the faults stopped")
        else:
            self.event("check", "every BGP session Established")

    def _cleanup_pods_without_ip(self) -> None:
        for pod in self.state().pods:
            if pod.namespace == CHURN_NS and not pod.ips:
                self.event("check", f"{pod.ref} has no IP (its add was interrupted): deleting it")
                self._del_pod(pod)

    def _check_ipam(self, when: str) -> None:
        from felixpy.ipam import check as ipam_check

        store = pods.open_datastore(self.lab)
        try:
            report = None
            # The check reads one list per prefix; a problem that is real is there on every read.
            for _ in range(3):
                report = ipam_check.check(store)
                if not report.problems:
                    break
                time.sleep(1.0)
        finally:
            store.close()
        assert report is not None
        problems = [f"{p.kind}: {p.detail}" for p in report.problems]
        self.report.ipam_check[when] = problems
        if problems:
            self.problem(f"ipam check ({when}): {len(problems)} problems, first: {problems[0]}")
        else:
            self.event("check", f"ipam check ({when}): clean")

    def _predict(self, sources: list[PodState], targets: list[PodState], port: int) -> dict[tuple[str, str], bool]:
        """What `felixctl policy explain` says for every pair (the same code path)."""
        from felixpy.ctl.main import _failsafe_ports, _find_peer, _load_policy_world
        from policy.evaluate import explain

        store = pods.open_datastore(self.lab)
        try:
            world = _load_policy_world(store)
        finally:
            store.close()
        failsafe_in, failsafe_out = _failsafe_ports()
        others = [*world.network_sets, *(h.endpoint for h in world.host_endpoints)]
        out = {}
        for src in sources:
            for dst in targets:
                if src is dst:
                    continue
                verdict = explain(_find_peer(src.ref, world), _find_peer(dst.ref, world), port, "tcp",
                                  policies=world.policies, profiles=world.profiles, tiers=world.tiers,
                                  others=others, failsafe_inbound=failsafe_in, failsafe_outbound=failsafe_out)
                out[(src.ref, dst.ref)] = verdict.allowed
        return out

    def _check_matrix(self) -> None:
        st = self.state()
        every = pods.all_pods(st)
        served = {p.ref for p in every if any(s.endswith(f"tcp:{MATRIX_PORT}") for s in p.serve)}
        predicted = {pair: ok and pair[1] in served for pair, ok in self._predict(every, every, MATRIX_PORT).items()}
        done = self.cli("matrix", "--ports", str(MATRIX_PORT), "--protos", "tcp", "--timeout", "2", "-o", "json")
        if done.returncode != 0:
            self.problem(f"matrix: {_last_line(done)}")
            return
        measured = json.loads(done.stdout)["results"][f"tcp/{MATRIX_PORT}"]
        by_ref = {p.ref: p for p in every}
        mismatches = []
        for (src, dst), want in sorted(predicted.items()):
            got = measured[src][dst]
            if got != want and want:
                # A connect that should work may time out on a loaded machine: probe again.
                for _ in range(3):
                    got = _probe(self.lab, by_ref[src], [f"tcp:{by_ref[dst].ips[0]}:{MATRIX_PORT}"], 3.0)[0]
                    if got:
                        break
            if got != want:
                mismatches.append(f"{src} -> {dst}: explain says {'allowed' if want else 'denied'}, "
                                  f"the probe {'connected' if got else 'was blocked'}")
        allowed = sum(predicted.values())
        self.report.matrix = {"pods": len(every), "pairs": len(predicted), "allowed": allowed,
                              "denied": len(predicted) - allowed, "mismatches": mismatches}
        if mismatches:
            self.problem(f"matrix differs from policy explain on {len(mismatches)} pairs, first: {mismatches[0]}")
        else:
            self.event("check", f"matrix equals policy explain: {len(predicted)} pairs "
                                f"({allowed} allowed, {len(predicted) - allowed} denied)")

    def _check_converged(self) -> None:
        """A fresh agent programs from scratch: if restarting it changes nothing, the tables were right."""
        for node in self.nodes:
            before = kernel_tables(topology.node_netns(self.lab, node))
            done = self.cli("agent", "restart", node)
            if done.returncode != 0:
                self.problem(f"agent restart {node}: {_last_line(done)}")
                continue
            # `agent restart` returns once the new agent's CNI server answers, which it starts only
            # after its first complete apply (in mode bgp: after the sidecar's replay).
            after = kernel_tables(topology.node_netns(self.lab, node))
            diff = diff_tables(before, after)
            self.report.converged[node] = diff
            if diff:
                self.problem(f"{node}: a fresh agent changed its kernel tables: {diff[0]}"
                             + (f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""))
        if not any(self.report.converged.values()):
            self.event("check", f"kernel tables converged on {', '.join(self.nodes)} "
                                "(a fresh agent changed no route, rule, ipset or tunnel entry)")

    def _finish_traffic(self) -> None:
        """`stop` to every pod, one summary from each, then `exit` to all: a pod's echo server
        stays up until every other pod has drained its flows."""
        flows: list[dict[str, Any]] = []
        ping_results: list[tuple[str, dict[str, Any]]] = []
        for proc in self._traffic.values():
            with contextlib.suppress(BrokenPipeError, OSError):
                assert proc.stdin is not None
                proc.stdin.write("stop\n")
                proc.stdin.flush()
        for ref, proc in self._traffic.items():
            line = _read_line(proc, 30.0)
            try:
                summary = json.loads(line)
            except ValueError:
                self.problem(f"traffic of {ref} gave no summary: {line[-200:] or _stderr(proc)}")
                continue
            for f in summary["flows"]:
                flows.append({"from": ref, **f})
            for p in summary["pings"]:
                ping_results.append((ref, p))
        for proc in self._traffic.values():
            with contextlib.suppress(BrokenPipeError, OSError):
                assert proc.stdin is not None
                proc.stdin.write("exit\n")
                proc.stdin.close()
        for proc in self._traffic.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._traffic.clear()
        self.report.flows = flows
        self._account_pings(ping_results)

    def _account_pings(self, results: list[tuple[str, dict[str, Any]]]) -> None:
        st = self.state()
        node_of_ip = {ip: p.node for p in st.pods if p.namespace == STEADY_NS for ip in p.ips}
        node_of_ref = {p.ref: p.node for p in st.pods}
        cuts = [w for w in self.report.windows if w.kind == "link-cut"]
        sent = received = excused = 0
        unexcused: list[str] = []
        latest_after_cut = 0.0
        for ref, p in results:
            src_node, dst_node = node_of_ref.get(ref, "?"), node_of_ip.get(p["target"], "?")
            sent += p["sent"]
            received += p["received"]
            for t in p["lost"]:
                window = next((w for w in cuts if src_node != dst_node and w.target in (src_node, dst_node)
                               and w.start - CUT_LEAD <= t <= w.end + LINK_GRACE), None)
                if window is not None:
                    excused += 1
                    latest_after_cut = max(latest_after_cut, t - window.end)
                else:
                    unexcused.append(f"{ref} -> {p['target']} at {t - self.started:.1f} s")
        self.report.pings = {"sent": sent, "received": received, "lost": sent - received,
                             "lostDuringLinkCuts": excused, "lostOtherwise": len(unexcused),
                             "latestExcusedLossAfterLinkUpSeconds": round(latest_after_cut, 3),
                             "unexcused": unexcused[:50]}

    def _cleanup(self) -> None:
        for name in sorted(self._applied):
            done = self.cli("delete", "-f", self._policy_file(name))
            if done.returncode != 0:
                self.problem(f"cleanup: delete policy {name}: {_last_line(done)}")
        for pod in self.state().pods:
            if pod.namespace in (STEADY_NS, CHURN_NS):
                for _ in range(3):
                    if self.cli("pod", "del", pod.ref).returncode == 0:
                        with self._lock:
                            for ip in pod.ips:
                                self._holders.pop(ip, None)
                        break
                else:
                    self.problem(f"cleanup: pod del {pod.ref} kept failing")

    # -- the verdict --------------------------------------------------------------------------
    def _verdict(self) -> None:
        r = self.report
        broken = [f for f in r.flows if f.get("broken") is not None or not f.get("connected")]
        if broken:
            self.problem(f"{len(broken)} of {len(r.flows)} TCP flows broke, first: {broken[0]['from']} -> "
                         f"{broken[0]['target']}: {broken[0].get('broken')}")
        if r.pings.get("lostOtherwise"):
            self.problem(f"{r.pings['lostOtherwise']} pings lost outside link cuts, first: {r.pings['unexcused'][0]}")
        if r.duplicates:
            self.problem(f"{len(r.duplicates)} duplicate IPs, first: {r.duplicates[0]}")
        ok_adds = r.churn.get("pod-add", Tally()).ok
        if not ok_adds or not sum(r.faults.values()):
            self.problem(f"nothing happened: {ok_adds} pods added, {sum(r.faults.values())} faults injected")


def kernel_tables(netns: str) -> dict[str, list[str]]:
    """A node's routes, iptables (both backends), ipsets and VXLAN entries, normalised to compare."""
    def run(*argv: str) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return done.stdout if done.returncode == 0 else ""

    tables: dict[str, list[str]] = {}
    for family in ("-4", "-6"):
        tables[f"routes{family}"] = sorted(run("ip", "-n", netns, family, "route", "show", "table", "all").splitlines())
    for save in ("iptables-save", "iptables-legacy-save", "ip6tables-save"):
        for name, rules in _iptables(run("ip", "netns", "exec", netns, save)).items():
            tables[f"{save}:{name}"] = rules
    tables["ipsets"] = sorted(run("ip", "netns", "exec", netns, "ipset", "save").splitlines())
    if run("ip", "-n", netns, "link", "show", "vxlan.calico"):
        tables["vxlan-fdb"] = sorted(run("bridge", "-n", netns, "fdb", "show", "dev", "vxlan.calico").splitlines())
        tables["vxlan-neigh"] = sorted(run("ip", "-n", netns, "neigh", "show", "dev", "vxlan.calico",
                                           "nud", "permanent").splitlines())
    return tables


def _iptables(text: str) -> dict[str, list[str]]:
    """table/chain -> its rules in order (chain declarations without their counters)."""
    out: dict[str, list[str]] = {}
    table = ""
    for line in text.splitlines():
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            out.setdefault(f"{table}/{name}", []).insert(0, f"policy {policy}")
        elif line.startswith("-A "):
            chain = line.split()[1]
            out.setdefault(f"{table}/{chain}", []).append(line)
    return out


def diff_tables(before: dict[str, list[str]], after: dict[str, list[str]]) -> list[str]:
    diff = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name, []), after.get(name, [])
        if old == new:
            continue
        gone = [line for line in old if line not in new]
        added = [line for line in new if line not in old]
        if not gone and not added:
            diff.append(f"{name}: reordered")
        diff += [f"{name}: removed {line}" for line in gone] + [f"{name}: added {line}" for line in added]
    return diff


def _probe(lab: str, src: PodState, targets: list[str], timeout: float) -> list[bool]:
    argv = ["ip", "netns", "exec", src.netns, sys.executable, "-m", "felixpy.lab.probe",
            "--lab", lab, "--timeout", f"{timeout:g}", *targets]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 20,
                              env={**procs.base_env(), procs.LAB_ENV: lab})
        result = json.loads(done.stdout)
        return [bool(r) for r in result] if isinstance(result, list) and len(result) == len(targets) \
            else [False] * len(targets)
    except (subprocess.TimeoutExpired, ValueError):
        return [False] * len(targets)


def _wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next stdout line of `proc`, or "" after `timeout` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    text = (done.stderr or done.stdout or "").strip()
    return text.splitlines()[-1] if text else f"exit {done.returncode}"


def _stderr(proc: subprocess.Popen[str]) -> str:
    with contextlib.suppress(Exception):
        proc.kill()
        _, err = proc.communicate(timeout=5)
        return (err or "").strip()[-200:]
    return ""


def summary_lines(report: Report) -> Iterator[str]:
    data = report.to_json()
    faults = ", ".join(f"{k} {v}" for k, v in data["faults"].items()) or "none"
    yield f"faults injected: {data['faultsTotal']} ({faults})"
    churn = ", ".join(f"{k} {v['ok']}" + (f" (+{v['failed']} failed)" if v["failed"] else "")
                      for k, v in data["churn"].items()) or "none"
    yield f"churn: {churn}"
    flows = data["flows"]
    yield f"TCP flows kept: {flows['kept']}/{flows['total']} (longest stall {flows['maxStallSeconds']:.1f} s)"
    p = data["pings"]
    if p:
        yield (f"pings: {p['sent']} sent, {p['lost']} lost ({p['lostDuringLinkCuts']} while their node's link "
               f"was cut, {p['lostOtherwise']} otherwise)")
    yield f"IPs handed out: {data['ipsHandedOut']}, duplicates: {len(data['duplicates'])}"
    for when, problems in data["ipamCheck"].items():
        yield f"ipam check ({when}): " + ("clean" if not problems else f"{len(problems)} problems")
    m = data["matrix"]
    if m:
        yield (f"matrix vs policy explain: {m['pairs'] - len(m['mismatches'])}/{m['pairs']} pairs agree "
               f"({m['allowed']} allowed, {m['denied']} denied)")
    if data["converged"]:
        bad = [n for n, d in data["converged"].items() if d]
        yield "kernel tables converged: " + ("every node" if not bad else f"no on {', '.join(bad)}")
    yield f"result: {data['result'].upper()}" + (f" ({len(data['problems'])} problems)" if data["problems"] else "")
    for problem in data["problems"]:
        yield f"  - {problem}"
