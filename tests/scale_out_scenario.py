"""The multi-host scenario (run inside a private network namespace, see tests/orthanc.py): six "hosts" on one
PostgreSQL and one shared storage root, a real Orthanc as the PACS, two DCMTK senders, and two hosts killed.

Each host is a ``cxr-node serve <role>`` supervisor with a host name of its own (``unshare -u``: its holders
are ``<host>:<pid>:<start>``, so no other host can tell it died except by its lease running out), its own run
directory and no supervisor in common with the others: receivers A and B (two ports standing for one AE title
behind a load balancer), workers A and B, senders A and B. Worker A is killed with SIGKILL (the whole host:
its process group) while it holds a batch; sender A while it delivers. The report says what Orthanc holds per
source study, how every job ended, and what happened to the jobs the dead hosts held.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from tests.integration.helpers import wait_for
from tests.orthanc import Orthanc
from tests.postgres import PostgresServer

HOSTS = ("receiver-a", "receiver-b", "worker-a", "worker-b", "sender-a", "sender-b")
WORKER_LEASE_S = 6.0
SENDER_LEASE_S = 10.0
FINISHED = ("delivered", "dead", "skipped", "quarantined")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def can_rename_host() -> str:
    """'' when a process can get a host name of its own here (``unshare -u``), else why not."""
    done = subprocess.run(["unshare", "-u", "hostname", "probe"], capture_output=True, check=False)
    return "" if done.returncode == 0 else f"unshare -u is not permitted here: {done.stderr.decode().strip()}"


class Host:
    """One host running one role: its own config (same database and storage root), run folder and log."""

    def __init__(self, name: str, base: Path, common: dict[str, Any], port: int, extra: dict[str, Any]) -> None:
        self.name, self.role = name, name.split("-")[0]
        self.folder = base / name
        self.folder.mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps(common))
        config["node"]["port"] = port
        config["storage"]["runtime_dir"] = str(self.folder / "run")
        for section, values in extra.items():
            config.setdefault(section, {}).update(values)
        self.config = self.folder / "node.yaml"
        self.config.write_text(json.dumps(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Host:
        """Start the role's supervisor in a new session and UTS namespace, named after the host."""
        serve = [sys.executable, "-m", "cxr_node", "serve", self.role, "--config", str(self.config)]
        command = ["unshare", "-u", "sh", "-c", f'hostname {self.name} && exec "$@"', "sh", *serve]
        log = (self.folder / "serve.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def ready(self) -> bool:
        """True once its supervisor reported every child up."""
        return (self.folder / "run" / f"{self.role}.ready").exists()

    def kill(self) -> None:
        """SIGKILL the whole host (its process group): nothing of it says goodbye."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM its supervisor and wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


def _query(conn: psycopg.Connection[Any], sql: str, *args: object) -> list[tuple[Any, ...]]:
    return conn.execute(sql, args or None).fetchall()  # type: ignore[arg-type]  # test-only constant SQL


def scale_out(folder: str, count: str) -> dict[str, Any]:
    """Run the scenario with ``count`` phantom images; return the JSON report."""
    base, n = Path(folder), int(count)
    server = PostgresServer().start()
    hosts: list[Host] = []
    orthanc = Orthanc(base / "orthanc", _free_port(), _free_port()).start()
    try:
        url = server.create_database("cxr")
        password_file = server.write_password_file(base / "db-password")
        images = base / "images"
        subprocess.run(
            [sys.executable, "-m", "cxr_node", "phantoms", "--n", str(n), "--out", str(images), "--size", "384",
             "--seed", "11"],
            check=True, capture_output=True,
        )  # fmt: skip
        for i, image in enumerate(sorted((images / "images").glob("*.dcm"))):  # one half for each receiver
            half = images / ("a" if i % 2 else "b")
            half.mkdir(exist_ok=True)
            image.rename(half / image.name)
        common: dict[str, Any] = {
            "node": {"host": "127.0.0.1", "receiver_processes": 1},
            "storage": {"root": str(base / "shared"), "database": url, "database_password_file": str(password_file)},
            "destinations": [
                {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
            ],
            "delivery": {"backoff_initial_s": 0.5, "backoff_max_s": 2, "poll_interval_ms": 200,
                         "lease_s": SENDER_LEASE_S, "jobs_per_association": 2},
            "worker": {"batch_size": 4, "batch_wait_ms": 50, "lease_s": WORKER_LEASE_S, "poll_interval_ms": 100},
            "metrics": {"enabled": False},
            "logging": {"format": "json"},
        }  # fmt: skip
        first = Host("setup", base, common, 0, {})
        subprocess.run(
            [sys.executable, "-m", "cxr_node", "db", "upgrade", "--config", str(first.config)],
            check=True, capture_output=True,
        )  # fmt: skip
        ports = {"receiver-a": _free_port(), "receiver-b": _free_port()}
        extra: dict[str, dict[str, Any]] = {
            # worker A waits long to fill its batch: it is killed holding one
            "worker-a": {"worker": {"batch_size": 8, "batch_wait_ms": 4000}},
        }
        for name in HOSTS:
            hosts.append(Host(name, base, common, ports.get(name, 0), extra.get(name, {})).start())
        if not wait_for(lambda: all(h.ready() for h in hosts), 120):
            raise RuntimeError("not every host became ready: " + ", ".join(h.name for h in hosts if not h.ready()))
        by_name = {h.name: h for h in hosts}
        conn = psycopg.connect(url, password=server.password, autocommit=True)
        senders = [
            subprocess.Popen(
                [
                    "storescu",
                    "-aec",
                    "CXR_NODE",
                    "-aet",
                    "PACS",
                    "+sd",
                    "+r",
                    "127.0.0.1",
                    str(ports[name]),
                    str(images / half),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for name, half in (("receiver-a", "a"), ("receiver-b", "b"))
        ]
        started = time.monotonic()
        holding = "SELECT 1 FROM jobs WHERE state = 'running' AND holder LIKE 'worker-a:%'"
        held = wait_for(lambda: bool(_query(conn, holding)), 60)
        held_ids = [row[0] for row in _query(conn, "SELECT id FROM jobs WHERE holder LIKE 'worker-a:%'")]
        by_name["worker-a"].kill()
        worker_killed_s = round(time.monotonic() - started, 1)
        delivering = wait_for(
            lambda: bool(_query(conn, "SELECT 1 FROM deliveries WHERE holder LIKE 'sender-a:%' AND state = 'pending'")),
            90, every=0.05,
        )  # fmt: skip
        by_name["sender-a"].kill()
        sender_killed_s = round(time.monotonic() - started, 1)
        for sender in senders:
            sender.wait(180)

        def settled() -> bool:
            states = dict(_query(conn, "SELECT state, COUNT(*) FROM jobs GROUP BY state"))
            return sum(states.values()) >= n and all(state in FINISHED for state in states)

        finished = wait_for(settled, 240, every=0.5)
        finished_s = round(time.monotonic() - started, 1)
        histories = {
            job_id: [tuple(row) for row in _query(
                conn, "SELECT from_state, to_state, reason, holder FROM job_events WHERE job_id = %s ORDER BY id",
                job_id)]
            for job_id in held_ids
        }  # fmt: skip
        report = {
            "worker_held_jobs_when_killed": held,
            "sender_was_delivering_when_killed": delivering,
            "killed_at_s": {"worker-a": worker_killed_s, "sender-a": sender_killed_s},
            "finished": finished,
            "finished_s": finished_s,
            "jobs": dict(_query(conn, "SELECT state, COUNT(*) FROM jobs GROUP BY state")),
            "held_by_dead_worker": histories,
            "running_left": _query(conn, "SELECT id, holder, lease_until FROM jobs WHERE state = 'running'"),
            "inferred_by_host": dict(_query(
                conn, "SELECT split_part(holder, ':', 1), COUNT(*) FROM job_events WHERE to_state = 'inferred'"
                " GROUP BY 1")),
            "index_cases": _query(conn, "SELECT COUNT(*) FROM embeddings")[0][0],
            "index_cases_by_host": dict(_query(
                conn, "SELECT split_part(j.holder, ':', 1), COUNT(*) FROM job_events j WHERE j.to_state = 'inferred'"
                " AND EXISTS (SELECT 1 FROM cases c JOIN jobs k ON k.sop_instance_uid = c.sop_instance_uid"
                " WHERE k.id = j.job_id) GROUP BY 1")),
            "sqlite_index_on_shared_root": (base / "shared" / "index").exists(),
            "storescu_rc": [sender.returncode for sender in senders],
            "sources": len(list(images.rglob("*.dcm"))),
        }  # fmt: skip
        conn.close()
        per_study: dict[str, dict[str, int]] = {}
        for tags in orthanc.instances():
            counts = per_study.setdefault(tags["StudyInstanceUID"], {})
            counts[tags.get("Modality", "")] = counts.get(tags.get("Modality", ""), 0) + 1
        report["per_study"] = per_study
        return report
    finally:
        for host in hosts:
            host.stop()
        orthanc.stop()
        server.stop()
        shutil.rmtree(base / "shared" / "inbox", ignore_errors=True)
