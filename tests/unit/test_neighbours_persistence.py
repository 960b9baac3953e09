"""The neighbour index across restarts, on each case store: kill -9, checkpoints and their replay, damaged files,
other processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cxr_node.neighbours import CHECKPOINTS, EngineParams, NewCase, ReplicaIndex
from cxr_node.neighbours.checkpoint import path_for
from tests.index_backends import BACKENDS, IndexBackend, index_backend

VERSION = "demo-1.0"
DIM = 16
KILL_AFTER = 120  # returned adds to wait for before SIGKILL
WAIT_S = 60.0
WRITER = """
import os
import sys
import numpy as np
from pathlib import Path
from cxr_node.neighbours import EngineParams, NewCase, ReplicaIndex

store = None
if len(sys.argv) > 2:
    from cxr_node.neighbours.postgres import PgCaseStore
    store = PgCaseStore(sys.argv[2], os.environ["CXR_NODE_DB_PASSWORD"])
index = ReplicaIndex(Path(sys.argv[1]), EngineParams(exact_max=64, train_per_list=8), store=store)
rng = np.random.default_rng(0)
for row in range(100_000):
    vector = rng.standard_normal({dim})
    case = NewCase(f"1.2.{{row}}", f"1.3.{{row}}", f"A{{row}}", "", f"p{{row}}")
    index.add("{version}", vector, case)
    print(row, flush=True)
    if row % 25 == 24:
        index.checkpoint("{version}")
"""


def vectors(count: int) -> np.ndarray:
    """Return the vectors the writer adds, in its order (same seeded generator)."""
    rng = np.random.default_rng(0)
    return np.array([rng.standard_normal(DIM) for _ in range(count)])


def new_case(row: int) -> NewCase:
    """Return the case of row ``row``, as the writer makes it."""
    return NewCase(f"1.2.{row}", f"1.3.{row}", f"A{row}", "", f"p{row}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> IndexBackend:
    """Each case store: the SQLite file, a fresh PostgreSQL database."""
    return index_backend(request)


def nearest_sop(index: ReplicaIndex, vector: np.ndarray) -> tuple[str, float]:
    """Return the SOP Instance UID and similarity of the top hit for ``vector``."""
    (top,) = index.query(VERSION, vector, 1, patient_hash=None, study_instance_uid=None)
    return top.case.sop_instance_uid, top.similarity


def test_every_returned_add_survives_kill_9(tmp_path: Path, backend: IndexBackend) -> None:
    """A writer killed with SIGKILL mid-stream (adds and checkpoints) loses no add that had returned."""
    root = tmp_path / "index"
    script = WRITER.format(dim=DIM, version=VERSION)
    args, env = [str(root)], dict(os.environ)
    if backend.name == "postgresql":
        args, env = [str(root), backend.url], {**env, "CXR_NODE_DB_PASSWORD": backend.password}
    writer = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, env=env)
    returned: list[int] = []
    deadline = time.monotonic() + WAIT_S
    try:
        assert writer.stdout is not None
        while len(returned) < KILL_AFTER and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                break
            returned.append(int(line))
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        rest, _ = writer.communicate(timeout=30)
    returned += [int(line) for line in rest.split()]
    assert writer.returncode == -signal.SIGKILL
    assert len(returned) >= KILL_AFTER, "the writer did not get far enough"
    expected = vectors(len(returned))
    with backend.open(root, EngineParams(exact_max=64, train_per_list=8)) as index:
        assert index.size(VERSION) >= len(returned)
        lists = index.load(VERSION).engines["store"]
        nprobe = int(lists.split(":")[1]) if ":" in lists else None
        for row in returned:
            found = index.query(VERSION, expected[row], 1, patient_hash=None, study_instance_uid=None, nprobe=nprobe)
            assert (found[0].case.sop_instance_uid, round(found[0].similarity, 5)) == (f"1.2.{row}", 1.0)
        index.checkpoint(VERSION)
    assert [p.name for p in (root / CHECKPOINTS).iterdir()] == [path_for(root / CHECKPOINTS, VERSION).name]


def test_checkpoint_start_replays_later_adds_and_drops_deletions(tmp_path: Path, backend: IndexBackend) -> None:
    """A start from a checkpoint adds what was committed after it and drops what was purged after it."""
    root = tmp_path / "index"
    stored = vectors(200)
    with backend.open(root) as index:
        index.add_many(VERSION, stored[:150], [new_case(r) for r in range(150)])
        assert index.checkpoint() == 0  # nothing loaded yet: nothing to write
        assert index.checkpoint(VERSION) == 1
        assert index.checkpoint(VERSION) == 0  # unchanged since
        index.add_many(VERSION, stored[150:], [new_case(r) for r in range(150, 200)])
    with backend.open(root) as other:  # not loaded: the purge leaves the checkpoint to be rewritten
        assert other.purge_study("1.3.3") == 1
    checkpoint_file = path_for(root / CHECKPOINTS, VERSION)
    assert not checkpoint_file.exists()
    with backend.open(root) as index:
        assert index.load(VERSION).origin == "database"
        assert index.checkpoint() == 1
        index.add_many(VERSION, stored[:1] * -1.0, [new_case(500)])
    with backend.open(root) as index:
        stats = index.load(VERSION)
        assert (stats.origin, stats.size) == ("checkpoint", 200)
        assert nearest_sop(index, stored[170]) == ("1.2.170", pytest.approx(1.0, abs=1e-6))
        assert nearest_sop(index, -stored[0])[0] == "1.2.500"
        assert nearest_sop(index, stored[3])[0] != "1.2.3"


def test_damaged_checkpoint_is_ignored_and_rebuilt(tmp_path: Path, backend: IndexBackend) -> None:
    """A checkpoint with a flipped byte or cut short is not trusted: the index is built from the database."""
    root = tmp_path / "index"
    stored = vectors(100)
    with backend.open(root) as index:
        index.add_many(VERSION, stored, [new_case(r) for r in range(100)])
        index.checkpoint(VERSION)
    path = path_for(root / CHECKPOINTS, VERSION)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with backend.open(root) as index:
        assert index.load(VERSION).origin == "database"
        assert nearest_sop(index, stored[42])[0] == "1.2.42"
        assert index.checkpoint() == 1
    path.write_bytes(path.read_bytes()[:-40])
    with backend.open(root) as index:
        assert index.load(VERSION).origin == "database"
        assert nearest_sop(index, stored[7])[0] == "1.2.7"


def test_a_second_connection_sees_adds_purges_and_rebuilds(tmp_path: Path, backend: IndexBackend) -> None:
    """An index held open (the worker) follows what another opener (the CLI) commits, at its next call."""
    root = tmp_path / "index"
    stored = vectors(80)
    with backend.open(root) as worker, backend.open(root) as cli:
        worker.add_many(VERSION, stored[:40], [new_case(r) for r in range(40)])
        assert nearest_sop(worker, stored[5])[0] == "1.2.5"
        cli.add_many(
            VERSION, stored[40:], [NewCase(f"1.2.{r}", "1.3.x", "", "", "p", source="library") for r in range(40, 80)]
        )
        assert nearest_sop(worker, stored[60])[0] == "1.2.60"
        cli.purge_study("1.3.5")
        assert nearest_sop(worker, stored[5])[0] != "1.2.5"
        cli.rebuild(VERSION, [(new_case(r), stored[r]) for r in range(10)])
        assert worker.size(VERSION) == 10
        assert len(worker.query(VERSION, stored[0], 50, patient_hash=None, study_instance_uid=None)) == 10


def test_reopened_index_keeps_ivf_results(tmp_path: Path, backend: IndexBackend) -> None:
    """An IVF index grown by adds answers the same after a restart from its checkpoint."""
    root = tmp_path / "index"
    params = EngineParams(exact_max=200, train_per_list=8)
    rng = np.random.default_rng(4)
    stored = rng.standard_normal((1500, DIM)).astype(np.float32)
    queries = rng.standard_normal((10, DIM))
    with backend.open(root, params) as index:
        index.add_many(VERSION, stored[:10], [new_case(r) for r in range(10)])
        index.load(VERSION)
        index.add_many(VERSION, stored[10:], [new_case(r) for r in range(10, 1500)])
        assert index.stats(VERSION).engines["store"].startswith("ivf:")
        before = [index.query(VERSION, q, 10, patient_hash=None, study_instance_uid=None) for q in queries]
        index.checkpoint()
    with backend.open(root, params) as index:
        after = [index.query(VERSION, q, 10, patient_hash=None, study_instance_uid=None) for q in queries]
        assert index.stats(VERSION).origin == "checkpoint"
    assert after == before
