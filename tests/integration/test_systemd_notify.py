"""`cxr-node serve` under a Type=notify unit: READY=1 once every child is up, STOPPING=1 on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from cxr_node.config import Settings
from tests.integration.helpers import write_config


def test_serve_tells_systemd_when_ready_and_when_stopping(settings: Settings, tmp_path: Path) -> None:
    """The supervisor sends READY=1 (with a status line) after start-up and STOPPING=1 when told to stop."""
    address = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(address))
    listener.settimeout(120)
    config = write_config(settings, tmp_path / "node.yaml")
    env = {**os.environ, "NOTIFY_SOCKET": str(address)}
    node = subprocess.Popen(
        [sys.executable, "-m", "cxr_node", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        ready = listener.recv(4096).decode()
        assert "READY=1" in ready and f"port {settings.node.port}" in ready and "worker" in ready
        node.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert node.wait(90) == 0
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
        listener.close()
