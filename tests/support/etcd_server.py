"""Start and stop a real, throwaway etcd server for tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdServer:
    proc: subprocess.Popen[bytes]
    data_dir: str
    endpoint: str
    port: int
    peer_port: int

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


def start_etcd(binary: str = "/usr/bin/etcd", timeout: float = 20.0) -> EtcdServer:
    # tmpfs when there is one: etcd fsyncs every write, and tests measure our code, not the disk.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    data_dir = tempfile.mkdtemp(prefix="fxt-etcd-", dir=shm)
    port, peer_port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(os.path.join(data_dir, "etcd.log"), "wb")
    proc = subprocess.Popen(
        [
            binary,
            "--name", "fxt",
            "--data-dir", os.path.join(data_dir, "data"),
            "--listen-client-urls", endpoint,
            "--advertise-client-urls", endpoint,
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"fxt=http://127.0.0.1:{peer_port}",
            "--log-level", "error",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited with {proc.returncode}; see {data_dir}/etcd.log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return EtcdServer(proc, data_dir, endpoint, port, peer_port)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"etcd did not listen on {endpoint} within {timeout} s")
