"""/metrics and /healthz over HTTP on loopback, read from the real store and the real SCP."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cxr_node.app import Receiver, open_store
from cxr_node.config import Settings
from cxr_node.jobs.leases import this_process
from cxr_node.metrics import MetricsServer
from tests.integration.helpers import small_cr, store_all


def get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path; return (status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_count_jobs_and_healthz_follows_the_scp(make_settings: Callable[..., Settings], chest_cr: Path) -> None:
    """Received and queued images show in /metrics; /healthz is 200 while the SCP listens and 503 after it stops."""
    settings = make_settings(**{"metrics.stuck_after_s": 3600})
    node = Receiver(settings).start()
    server = MetricsServer(settings, open_store(settings)).start()
    port = server.httpd.server_address[1]
    try:
        assert store_all(node.port, [small_cr(chest_cr, f"m{i}") for i in range(3)]) == [0, 0, 0]
        code, text = get(port, "/metrics")
        assert code == 200
        assert 'cxr_node_jobs{state="queued"} 3' in text
        assert "cxr_node_queue_depth 3" in text and "cxr_node_disk_used_ratio" in text
        assert "# TYPE cxr_node_inference_seconds histogram" in text
        assert get(port, "/healthz")[0] == 503  # jobs wait and no worker has ever been alive
        node.store.jobs.renew(this_process("worker"), 60)
        assert get(port, "/healthz") == (200, "ok\n")
        node.stop(grace_s=5)
        code, text = get(port, "/healthz")
        assert code == 503 and "not listening" in text
    finally:
        server.stop()
        node.stop(grace_s=1)


def test_a_supervisor_of_some_roles_judges_only_its_own_on_this_host(
    make_settings: Callable[..., Settings], chest_cr: Path
) -> None:
    """A receiver host is healthy while its SCP answers, whatever waits for workers elsewhere; a worker host is
    healthy while its own worker renews, not because another host's worker does; a store it cannot read is
    the worker host's problem, never the receiver's."""
    from cxr_node.jobs.leases import Holder
    from cxr_node.metrics import role_health

    settings = make_settings(**{"metrics.stuck_after_s": 60})
    node = Receiver(settings).start()
    server = MetricsServer(settings, open_store(settings), roles=["receiver"]).start()
    try:
        assert store_all(node.port, [small_cr(chest_cr, "r1")]) == [0]  # queued, and no worker anywhere
        assert get(server.httpd.server_address[1], "/healthz") == (200, "ok\n")
        store = node.store
        store.jobs.renew(Holder("worker", "another-host", 1, 1), 60)
        assert role_health(settings, store, ["worker"]) == ["this host's worker has not been alive for 60 s"]
        me = this_process("worker")
        store.jobs.renew(Holder("worker", me.host, 2**22 + 7, 1), 60)  # a worker of this host that died
        assert role_health(settings, store, ["worker"]) == ["this host's worker has not been alive for 60 s"]
        store.jobs.renew(me, 60)
        assert role_health(settings, store, ["worker", "sender"]) == ["this host's sender has not been alive for 60 s"]
        store.close()  # a store that cannot be read
        assert role_health(settings, store, ["receiver"]) == []
        [problem] = role_health(settings, store, ["worker"])
        assert problem.startswith("the store cannot be read")
    finally:
        server.stop()
        node.stop(grace_s=2)
