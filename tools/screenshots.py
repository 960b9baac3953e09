#!/usr/bin/env python3
"""Regenerate the viewer screenshots of docs/pacs-setup.md from the node's real outputs.

    make demo                                  # writes demo-output/ (the node's results for the demo images)
    .venv/bin/python tools/screenshots.py      # -> docs/images/{ohif-sr,ohif-overlay,orthanc-explorer-study,
                                               #    orthanc-webviewer-overlay}.png

It starts tools/viewer.py (Orthanc with DICOMweb and the Web Viewer plugin in a private network namespace,
holding every DICOM file of demo-output/, and OHIF served same-origin on 127.0.0.1), opens one study in
Debian's headless chromium through playwright-core, and saves what a radiologist sees: the SR and the
overlay in OHIF, the study in Orthanc Explorer, the overlay in the Orthanc Web Viewer. The PNGs are
reduced (960 px wide, 256 colours) to stay well under 300 KB each.

Options: --study <StudyInstanceUID> (default: of the synthetic phantoms, the one whose SR names the most
similar cases, then the highest ensemble probability; the real WG04 radiograph renders black in OHIF under
software WebGL), --out <folder>, --demo-output <folder>, --port <port>, --keep-raw (keep the full-size PNGs
and the browser's console log in <out>/raw/).

Needs: .venv (pydicom, Pillow: `make install`), Debian packages orthanc, orthanc-dicomweb, orthanc-webviewer
and chromium (`apt-get install -y chromium`; `npx playwright install` is not used), npm. The first run
fetches @ohif/app (into build/ohif/) and playwright-core (into build/screenshots/) from the npm registry;
build/ is git-ignored. Runs in about a minute.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PLAYWRIGHT = REPO / "build" / "screenshots"
PLAYWRIGHT_VERSION = "1.65.2"
CHROMIUM = "/usr/bin/chromium"
WIDTH = 960
LIMIT = 300_000


def first_probability(items: pydicom.Sequence) -> float | None:
    for item in items:
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        if item.ValueType == "NUM" and name == "Probability":
            return float(item.MeasuredValueSequence[0].NumericValue)
        if "ContentSequence" in item:
            found = first_probability(item.ContentSequence)
            if found is not None:
                return found
    return None


def similar_cases(ds: pydicom.Dataset) -> int:
    """The number of similar past cases the SR names (groups of its "Similar past cases" container)."""
    for item in ds.ContentSequence:
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "CXRN010":
            return len(item.ContentSequence)
    return 0


def pick_study(demo: Path) -> str:
    """The phantom study whose SR names the most similar cases, then has the highest ensemble probability."""
    best: tuple[int, float, str] | None = None
    for path in sorted((demo / "pacs").glob("sr-*.dcm")):
        ds = pydicom.dcmread(path)
        if not str(ds.PatientID).startswith("PH"):
            continue
        key = (similar_cases(ds), first_probability(ds.ContentSequence) or 0.0, str(ds.StudyInstanceUID))
        if best is None or key > best:
            best = key
    if best is None:
        sys.exit("screenshots: no SR of a phantom study in demo-output/pacs: run `make demo` first")
    return best[2]


def ensure_playwright() -> Path:
    module = PLAYWRIGHT / "node_modules" / "playwright-core" / "index.mjs"
    if not module.exists():
        PLAYWRIGHT.mkdir(parents=True, exist_ok=True)
        print(f"screenshots: installing playwright-core@{PLAYWRIGHT_VERSION} into {PLAYWRIGHT} (npm registry, once)")
        subprocess.run(
            [
                "npm",
                "install",
                "--prefix",
                str(PLAYWRIGHT),
                "--no-save",
                "--no-audit",
                "--no-fund",
                f"playwright-core@{PLAYWRIGHT_VERSION}",
            ],
            check=True,
        )
    return module


def browse(work: Path, job: dict[str, object]) -> None:
    """Run the browser half (tools/screenshots.mjs) with ``job``."""
    (work / "job.json").write_text(json.dumps(job))
    subprocess.run(["node", str(REPO / "tools" / "screenshots.mjs"), str(work / "job.json")], check=True, timeout=600)


def shrink(raw: Path, target: Path) -> int:
    image = Image.open(raw).convert("RGB")
    width = WIDTH
    while True:
        small = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
        small.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
        size = target.stat().st_size
        if size < LIMIT or width <= 480:
            return size
        width -= 160


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--demo-output", type=Path, default=REPO / "demo-output")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--study", help="StudyInstanceUID to show (default: see above)")
    parser.add_argument("--port", type=int, default=3011)
    parser.add_argument("--keep-raw", action="store_true")
    args = parser.parse_args()

    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            sys.exit(f"screenshots: {tool} is not installed")
    if not Path(CHROMIUM).exists():
        sys.exit("screenshots: chromium is not installed (apt-get install -y chromium)")
    study_uid = args.study or pick_study(args.demo_output)
    playwright = ensure_playwright()

    work = Path(tempfile.mkdtemp(prefix="cxr-shots-"))
    ready = work / "ready.json"
    viewer = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tools" / "viewer.py"),
            "--demo-output",
            str(args.demo_output),
            "--port",
            str(args.port),
            "--ready-file",
            str(ready),
        ]
    )
    try:
        deadline = time.monotonic() + 600  # the first run downloads OHIF
        while not ready.exists():
            if viewer.poll() is not None or time.monotonic() > deadline:
                sys.exit("screenshots: tools/viewer.py did not get ready")
            time.sleep(0.5)
        time.sleep(0.5)
        info = json.loads(ready.read_text())
        study = next((s for s in info["studies"] if s["study_uid"] == study_uid), None)
        if study is None:
            sys.exit(f"screenshots: study {study_uid} is not in Orthanc")
        overlay = next((s for s in study["series"] if s["modality"] == "OT"), None)
        if overlay is None:
            sys.exit(f"screenshots: study {study_uid} has no overlay (OT) series")
        raw = work / "raw"
        raw.mkdir()
        job = {
            "base": info["base"],
            "out": str(raw),
            "study_uid": study_uid,
            "orthanc_study": study["orthanc_id"],
            "sc_series": overlay["orthanc_id"],
            "webviewer": info["webviewer"],
            "chromium": CHROMIUM,
            "playwright": str(playwright),
            "phase": "main",
        }
        browse(work, job)
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"screenshots: study {study_uid} ({study['patient_id']})")
        for png in sorted(raw.glob("*.png")):
            size = shrink(png, args.out / png.name)
            print(f"  {args.out / png.name}  {size // 1024} KB")
        if args.keep_raw:
            shutil.copytree(raw, args.out / "raw", dirs_exist_ok=True)
            print(f"  full-size PNGs and the browser's console log: {args.out / 'raw'}")
    finally:
        if viewer.poll() is None:
            viewer.send_signal(signal.SIGTERM)
            viewer.wait(60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
