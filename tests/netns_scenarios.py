"""Scenarios run inside a private network namespace (see tests/orthanc.py); each prints a JSON report last.

Usage: ``python -m tests.netns_scenarios SCENARIO ARGS...`` (only from :func:`tests.orthanc.run_in_netns`).
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

from tests.orthanc import Orthanc


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def store(folder: str, *files: str) -> dict[str, Any]:
    """Start Orthanc, C-STORE ``files`` to it with the node's SCU, and list what Orthanc kept."""
    from cxr_node.send.scu import PeerAddress, send_files

    orthanc = Orthanc(Path(folder), free_port(), free_port()).start()
    try:
        results = send_files([Path(f) for f in files], PeerAddress("ORTHANC", "127.0.0.1", orthanc.dicom_port))
        stored = [
            {
                key: tags.get(key)
                for key in (
                    "SOPInstanceUID",
                    "SOPClassUID",
                    "StudyInstanceUID",
                    "Modality",
                    "SeriesDescription",
                    "PatientName",
                )
            }
            for tags in orthanc.instances()
        ]
        return {"statuses": [result.status for result in results], "stored": stored}
    finally:
        orthanc.stop()


SCENARIOS = {"store": store}

if __name__ == "__main__":
    report = SCENARIOS[sys.argv[1]](*sys.argv[2:])
    print(json.dumps(report))
