"""A real pynetdicom Storage SCP on loopback playing the PACS that receives the node's results."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification

from cxr_node.results.kinds import BY_NAME
from tests.conftest import free_port


class Pacs:
    """Accepts the output SOP classes (all, or ``accept`` only), stores what it gets in memory and on disk,
    answers with ``answer(dataset)`` (Success by default)."""

    def __init__(
        self,
        folder: Path,
        accept: tuple[str, ...] = ("sr", "sc", "seg", "pr"),
        ae_title: str = "PACS",
        answer: Callable[[Dataset], int] | None = None,
    ) -> None:
        self.folder = folder
        self.accept = accept
        self.ae_title = ae_title
        self.port = free_port()
        self.answer = answer or (lambda ds: 0x0000)
        self.received: list[Dataset] = []
        self.lock = threading.Lock()
        self.server = None

    def start(self) -> Pacs:
        """Listen on 127.0.0.1:port."""
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        for kind in self.accept:
            ae.add_supported_context(BY_NAME[kind].sop_class_uid, ALL_TRANSFER_SYNTAXES)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def stop(self) -> None:
        """Stop listening and close associations."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        code = self.answer(ds)
        if code == 0:
            with self.lock:
                self.received.append(ds)
            ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return code

    def uids(self) -> list[str]:
        """SOP Instance UIDs received with Success, in order."""
        with self.lock:
            return [str(ds.SOPInstanceUID) for ds in self.received]
