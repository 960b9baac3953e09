"""Helpers for integration tests: small CR instances, config files, pynetdicom senders."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from cxr_node.config import Settings


def small_cr(source: Path, name: str, size: int = 128, **changes: object) -> Dataset:
    """Return a ``size``-pixel crop of the real chest CR ``source`` with a new SOP Instance UID from ``name``."""
    ds = dcmread(source)
    pixels = ds.pixel_array[:size, :size].astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[name])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def write_config(settings: Settings, path: Path) -> Path:
    """Write ``settings`` as a YAML config file for the CLI and return its path."""
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    return path


def store_all(port: int, datasets: Iterable[Dataset | Path], calling: str = "PACS") -> list[int]:
    """C-STORE every data set or file over one association to the node on 127.0.0.1:``port``; return statuses."""
    items = list(datasets)
    ae = AE(ae_title=calling)
    classes = {str((dcmread(i, stop_before_pixels=True) if isinstance(i, Path) else i).SOPClassUID) for i in items}
    for uid in classes:
        ae.add_requested_context(uid, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_NODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(item).Status) for item in items]
    finally:
        assoc.release()


def echo(port: int, calling: str = "PACS") -> int | None:
    """C-ECHO the node; return the status, or None when no association could be made."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_NODE")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def wait_for(check: Callable[[], bool], seconds: float, every: float = 0.1) -> bool:
    """Poll ``check()`` every ``every`` seconds for at most ``seconds``; return its last answer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()
