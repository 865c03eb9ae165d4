"""A real Kubernetes control plane for the lab and the tests: etcd, kube-apiserver, kube-controller-manager.

The binaries are the ones scripts/build-kube.sh builds from Go modules (FELIXPY_KUBE_BIN, default
/var/cache/felixpy/kube/bin). Everything a real cluster's control plane has that felixpy meets is
on: TLS with certificates made here by `openssl` (a CA, the API server's serving certificate,
client certificates for the admin and the controller-manager), ServiceAccount tokens signed with
a key made here, the Node and RBAC authorizers, the default admission plugins plus NodeRestriction,
the watch cache, and the controller-manager's default controllers (namespace lifecycle,
service-account tokens, garbage collector, node lifecycle with its taints) each with its own
ServiceAccount credentials. What a real cluster has and this one has not: kubelets, a scheduler,
a container runtime, kube-proxy (the lab plays kubelet; see docs/kubernetes-datastore.md).

The processes are started by a `spawn` callable so that the lab can start them inside its fabric
namespace, marked as its own, and the tests on loopback; `stop()` ends exactly the pids it
started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

BIN_DIR = os.environ.get("FELIXPY_KUBE_BIN", "/var/cache/felixpy/kube/bin")
SERVICE_CIDR = "10.96.0.0/16"  # Kubernetes' usual default; stays clear of the lab's 10.244.0.0/16
START_TIMEOUT = 90.0  # the API server bootstraps its RBAC roles and priority levels first
TOKEN_SECONDS = 7 * 24 * 3600

Spawn = Callable[[str, list[str], str], int]  # (what, argv, log path) -> pid


class ControlPlaneError(Exception):
    """The control plane could not be built or started; one line naming what and where to look."""


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where each part listens. The API server is reached at `address`; etcd and the
    controller-manager listen on loopback only."""

    address: str = "127.0.0.1"
    apiserver_port: int = 6443
    etcd_port: int = 2379
    etcd_peer_port: int = 2380
    kcm_port: int = 10257

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.apiserver_port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_endpoints() -> Endpoints:
    """Free ports on 127.0.0.1, for a control plane in the root namespace (tests)."""
    return Endpoints("127.0.0.1", free_port(), free_port(), free_port(), free_port())


def binaries_missing(bin_dir: str = BIN_DIR) -> list[str]:
    return [b for b in ("etcd", "kube-apiserver", "kube-controller-manager")
            if not os.access(os.path.join(bin_dir, b), os.X_OK)]


def _default_spawn(what: str, argv: list[str], log_path: str) -> int:
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc.pid


@dataclass
class ControlPlane:
    """One control plane whose files (certificates, kubeconfigs, etcd data, logs) live in `dir`."""

    dir: str
    endpoints: Endpoints = field(default_factory=Endpoints)
    bin_dir: str = BIN_DIR
    spawn: Spawn = _default_spawn
    pids: dict[str, int] = field(default_factory=dict)

    # -- files --------------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @property
    def admin_kubeconfig(self) -> str:
        return self.path("admin.kubeconfig")

    @property
    def ca_file(self) -> str:
        return self.path("pki/ca.crt")

    def make_pki(self) -> None:
        """A CA and every certificate and key the control plane and its clients use (EC P-256:
        quick to make). Idempotent: existing files are kept, so restarts keep their identities."""
        pki = self.path("pki")
        os.makedirs(pki, mode=0o700, exist_ok=True)
        if not shutil.which("openssl"):
            raise ControlPlaneError("the control plane needs openssl (apt-get install openssl)")

        def openssl(*args: str) -> None:
            done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                raise ControlPlaneError(f"openssl {args[0]}: {done.stderr.strip().splitlines()[-1:]}")

        def key(name: str) -> str:
            path = f"{pki}/{name}.key"
            if not os.path.exists(path):
                openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
            return path

        if not os.path.exists(f"{pki}/ca.crt"):
            openssl("req", "-x509", "-new", "-key", key("ca"), "-days", "3650", "-subj", "/CN=felixpy-kube-ca",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", "-out", f"{pki}/ca.crt")

        def cert(name: str, subject: str, usage: str, sans: str | None = None) -> None:
            if os.path.exists(f"{pki}/{name}.crt"):
                return
            args = ["req", "-new", "-key", key(name), "-subj", subject, "-CA", f"{pki}/ca.crt",
                    "-CAkey", f"{pki}/ca.key", "-days", "3650",
                    "-addext", "basicConstraints=critical,CA:FALSE",
                    "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
                    "-addext", f"extendedKeyUsage={usage}", "-out", f"{pki}/{name}.crt"]
            if sans:
                args += ["-addext", f"subjectAltName={sans}"]
            openssl(*args)

        service_ip = "10.96.0.1"
        cert("apiserver", "/CN=kube-apiserver", "serverAuth",
             f"IP:{self.endpoints.address},IP:127.0.0.1,IP:{service_ip},DNS:localhost,DNS:kubernetes,"
             "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")
        cert("admin", "/O=system:masters/CN=felixpy-admin", "clientAuth")
        # The aggregation layer's client identity, as kubeadm sets it up (the API server and the
        # controller-manager read the request-header CA from a ConfigMap and complain without it).
        cert("front-proxy-client", "/CN=front-proxy-client", "clientAuth")
        cert("controller-manager", "/CN=system:kube-controller-manager", "clientAuth")
        key("sa")
        if not os.path.exists(f"{pki}/sa.pub"):
            openssl("pkey", "-in", f"{pki}/sa.key", "-pubout", "-out", f"{pki}/sa.pub")
        self._write_kubeconfig(self.admin_kubeconfig, "felixpy-admin",
                               {"client-certificate": f"{pki}/admin.crt", "client-key": f"{pki}/admin.key"})
        self._write_kubeconfig(self.path("controller-manager.kubeconfig"), "system:kube-controller-manager",
                               {"client-certificate": f"{pki}/controller-manager.crt",
                                "client-key": f"{pki}/controller-manager.key"})

    def _write_kubeconfig(self, path: str, user: str, credentials: dict[str, str]) -> None:
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "felixpy", "cluster": {"server": self.endpoints.server,
                                                         "certificate-authority": self.ca_file}}],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "felixpy", "context": {"cluster": "felixpy", "user": user}}],
            "current-context": "felixpy",
        }
        # JSON is YAML: every kubeconfig loader reads it.
        tmp = path + ".tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(config, f, indent=1)
        os.replace(tmp, path)

    # -- processes ----------------------------------------------------------------------------
    def etcd_argv(self) -> list[str]:
        e = self.endpoints
        client, peer = f"http://127.0.0.1:{e.etcd_port}", f"http://127.0.0.1:{e.etcd_peer_port}"
        return [os.path.join(self.bin_dir, "etcd"), "--name", "felixpy", "--data-dir", self.path("etcd"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"felixpy={peer}", "--initial-cluster-state", "new",
                "--listen-metrics-urls", "", "--log-level", "warn"]

    def apiserver_argv(self) -> list[str]:
        e, pki = self.endpoints, self.path("pki")
        argv = [os.path.join(self.bin_dir, "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{e.etcd_port}",
                f"--bind-address={e.address}", f"--advertise-address={e.address}",
                f"--secure-port={e.apiserver_port}",
                f"--tls-cert-file={pki}/apiserver.crt", f"--tls-private-key-file={pki}/apiserver.key",
                f"--client-ca-file={pki}/ca.crt",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki}/sa.pub",
                f"--service-account-signing-key-file={pki}/sa.key",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                # On top of the defaults (NamespaceLifecycle, ServiceAccount, TaintNodesByCondition,
                # DefaultTolerationSeconds, PodSecurity, ...), as kubeadm enables it.
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                f"--requestheader-client-ca-file={pki}/ca.crt",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki}/front-proxy-client.crt",
                f"--proxy-client-key-file={pki}/front-proxy-client.key",
                "--profiling=false",
                "--v=1"]
        if e.address.startswith("127."):
            # The "kubernetes" Service's endpoint must not be loopback: on loopback (tests) there
            # is none, which only in-cluster clients (none here) would notice.
            argv.append("--endpoint-reconciler-type=none")
        # An audit log of every request (benchmarks/bench_kube.py counts the agents' requests in
        # it): FELIXPY_KUBE_AUDIT_POLICY names an audit.k8s.io/v1 Policy file.
        audit_policy = os.environ.get("FELIXPY_KUBE_AUDIT_POLICY", "")
        if audit_policy:
            argv += [f"--audit-policy-file={audit_policy}", f"--audit-log-path={self.path('audit.log')}",
                     "--audit-log-format=json", "--audit-log-mode=batch", "--audit-log-batch-max-wait=1s"]
        return argv

    def controller_manager_argv(self) -> list[str]:
        e, pki = self.endpoints, self.path("pki")
        kubeconfig = self.path("controller-manager.kubeconfig")
        return [os.path.join(self.bin_dir, "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1", f"--secure-port={e.kcm_port}",
                f"--service-account-private-key-file={pki}/sa.key", f"--root-ca-file={pki}/ca.crt",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1"]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Certificates (once), then etcd, the API server and the controller-manager, each waited
        for. Raises ControlPlaneError naming the part and its log."""
        missing = binaries_missing(self.bin_dir)
        if missing:
            raise ControlPlaneError(f"{', '.join(missing)} not built in {self.bin_dir}: run scripts/build-kube.sh")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.make_pki()
        deadline = time.monotonic() + timeout
        try:
            self.start_etcd(deadline)
            self.start_apiserver(deadline)
            self.start_controller_manager(deadline)
        except BaseException:
            self.stop()  # nothing half-started outlives a failed start
            raise

    def start_etcd(self, deadline: float) -> None:
        self.pids["etcd"] = self.spawn("etcd", self.etcd_argv(), self.path("etcd.log"))
        self._wait("etcd", deadline, lambda: self._tcp_open("127.0.0.1", self.endpoints.etcd_port))

    def start_apiserver(self, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + START_TIMEOUT
        self.pids["kube-apiserver"] = self.spawn("kube-apiserver", self.apiserver_argv(),
                                                 self.path("kube-apiserver.log"))
        self._wait("kube-apiserver", deadline, self.apiserver_ready)

    def start_controller_manager(self, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + START_TIMEOUT
        self.pids["kube-controller-manager"] = self.spawn(
            "kube-controller-manager", self.controller_manager_argv(), self.path("kube-controller-manager.log"))
        self._wait("kube-controller-manager", deadline, self._controller_manager_ready)

    def ensure_running(self) -> list[str]:
        """Start again whatever part has exited, as kubelet restarts a static pod: the
        controller-manager exits when the API server goes away while it is still starting its
        controllers. Returns the parts started."""
        started = []
        for name, start in (("etcd", lambda: self.start_etcd(time.monotonic() + START_TIMEOUT)),
                            ("kube-apiserver", self.start_apiserver),
                            ("kube-controller-manager", self.start_controller_manager)):
            if not self.alive(name):
                start()
                started.append(name)
        return started

    def stop(self, *names: str) -> None:
        """Stop the named parts (all by default, the controller-manager first), by the pids this
        object started; SIGTERM, then SIGKILL after a bounded wait."""
        order = ["kube-controller-manager", "kube-apiserver", "etcd"]
        for name in [n for n in order if not names or n in names]:
            pid = self.pids.pop(name, 0)
            if pid:
                _stop_pid(pid)

    def alive(self, name: str) -> bool:
        return _alive(self.pids.get(name, 0))

    # -- readiness ----------------------------------------------------------------------------
    def _wait(self, name: str, deadline: float, ready: Callable[[], bool]) -> None:
        log = self.path(f"{name}.log")
        while time.monotonic() < deadline:
            if ready():
                return
            if not _alive(self.pids.get(name, 0)):
                raise ControlPlaneError(f"{name} exited: {_last_line(log)} (log {log})")
            time.sleep(0.2)
        raise ControlPlaneError(f"{name} not ready in time: {_last_line(log)} (log {log})")

    @staticmethod
    def _tcp_open(host: str, port: int) -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.load_cert_chain(self.path("pki/admin.crt"), self.path("pki/admin.key"))
        return ctx

    def apiserver_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoints.server + "/readyz", context=self.ssl_context(),
                                        timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _controller_manager_ready(self) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # its serving certificate is self-signed at start
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{self.endpoints.kcm_port}/healthz", context=ctx,
                                        timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    # -- the admin's API calls ----------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> Any:
        """One call as the cluster admin; returns the decoded JSON. Raises ControlPlaneError with
        the server's message."""
        data = None if body is None else json.dumps(body).encode()
        deadline = time.monotonic() + 60  # a restarted API server's caches take a while on a busy machine
        while True:
            req = urllib.request.Request(self.endpoints.server + path, data=data, method=method,
                                         headers={"Accept": "application/json", "Content-Type": content_type})
            try:
                with urllib.request.urlopen(req, context=self.ssl_context(), timeout=30) as resp:
                    raw = resp.read()
                return json.loads(raw) if raw else {}
            except urllib.error.HTTPError as err:
                raw = err.read()
                retry_after = err.headers.get("Retry-After")
                if err.code == 429 and retry_after and time.monotonic() < deadline:
                    # Not processed (e.g. a new CRD's watch cache is still initializing): as
                    # client-go does, wait as told and send it again.
                    time.sleep(min(float(retry_after), 1.0) if retry_after.isdigit() else 1.0)
                    continue
                try:
                    message = json.loads(raw).get("message", "")
                except ValueError:
                    message = raw[:200].decode(errors="replace")
                raise ControlPlaneError(f"{method} {path}: {err.code} {message}") from None
            except (OSError, urllib.error.URLError) as err:
                raise ControlPlaneError(f"{method} {path}: {err}") from None

    def service_account_token(self, namespace: str, name: str, seconds: int = TOKEN_SECONDS) -> str:
        """A bound token of that ServiceAccount (TokenRequest), as kubelet mounts into a pod."""
        answer = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                              {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                               "spec": {"expirationSeconds": seconds}})
        return str(answer["status"]["token"])

    def token_kubeconfig(self, namespace: str, name: str, path: str | None = None) -> str:
        """A kubeconfig file authenticating as that ServiceAccount; returns its path."""
        path = path or self.path(f"sa-{namespace}-{name}.kubeconfig")
        self._write_kubeconfig(path, f"system:serviceaccount:{namespace}:{name}",
                               {"token": self.service_account_token(namespace, name)})
        return path


# apiVersion -> kind -> (plural, namespaced): the kinds felixpy's manifests, the lab and the tests
# create as the admin.
KINDS: dict[str, dict[str, tuple[str, bool]]] = {
    "v1": {"Namespace": ("namespaces", False), "Node": ("nodes", False), "Pod": ("pods", True),
           "ServiceAccount": ("serviceaccounts", True), "ConfigMap": ("configmaps", True),
           "Secret": ("secrets", True)},
    "rbac.authorization.k8s.io/v1": {"ClusterRole": ("clusterroles", False),
                                     "ClusterRoleBinding": ("clusterrolebindings", False),
                                     "Role": ("roles", True), "RoleBinding": ("rolebindings", True)},
    "apiextensions.k8s.io/v1": {"CustomResourceDefinition": ("customresourcedefinitions", False)},
    "apps/v1": {"DaemonSet": ("daemonsets", True), "Deployment": ("deployments", True)},
    "networking.k8s.io/v1": {"NetworkPolicy": ("networkpolicies", True)},
}


def object_path(obj: dict[str, Any]) -> tuple[str, str]:
    """(collection path, name) of a Kubernetes object of one of KINDS."""
    api, kind = str(obj.get("apiVersion", "")), str(obj.get("kind", ""))
    meta = obj.get("metadata") or {}
    try:
        plural, namespaced = KINDS[api][kind]
    except KeyError:
        raise ControlPlaneError(f"{api} {kind}: not a kind this control plane helper creates") from None
    base = "/api/v1" if api == "v1" else f"/apis/{api}"
    if namespaced:
        base += f"/namespaces/{meta.get('namespace') or 'default'}"
    return f"{base}/{plural}", str(meta.get("name", ""))


def apply_objects(cp: "ControlPlane", objects: list[dict[str, Any]]) -> None:
    """Create each object, or replace it when it exists (kubectl apply without the merge), and
    wait for CRDs to be Established. Raises ControlPlaneError with the server's message."""
    crds = []
    for obj in objects:
        collection, name = object_path(obj)
        try:
            cp.request("POST", collection, obj)
        except ControlPlaneError as err:
            if ": 409 " not in str(err):
                raise
            current = cp.request("GET", f"{collection}/{name}")
            replacement = json.loads(json.dumps(obj))
            replacement.setdefault("metadata", {})["resourceVersion"] = current["metadata"]["resourceVersion"]
            cp.request("PUT", f"{collection}/{name}", replacement)
        if obj.get("kind") == "CustomResourceDefinition":
            crds.append(name)
    deadline = time.monotonic() + 30
    for name in crds:
        while True:
            crd = cp.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conditions = {c["type"]: c for c in (crd.get("status") or {}).get("conditions") or []}
            if conditions.get("Established", {}).get("status") == "True":
                break
            refused = conditions.get("NamesAccepted", {})
            if refused.get("status") == "False":
                raise ControlPlaneError(f"CRD {name}: {refused.get('message', 'names not accepted')}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"CRD {name} not Established within 30 s")
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                # Reap it when it is our child; otherwise just watch it go.
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                if not _alive(pid):
                    return
            time.sleep(0.05)


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return "no log"
    return lines[-1][:300] if lines else "empty log"
