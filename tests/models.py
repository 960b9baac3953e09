"""Small real model files for tests that need a worker but not meaningful findings."""

from __future__ import annotations

from pathlib import Path

import torch

from cxr_node.infer.registry import build_classifier, load_manifest, sha256_file
from cxr_node.infer.unet import UNet


def write_tiny_manifest(folder: Path) -> Path:
    """Write a manifest with a tiny random U-Net and one SqueezeNet member into ``folder``; return its path.

    The weights are random (seed 0): the worker runs the whole real path on them, and most masks are
    judged implausible, so most results are "not analysed".
    """
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(UNet(4, 3).state_dict(), folder / "unet.pt")
    torch.save(build_classifier("squeezenet1_1").state_dict(), folder / "squeeze.pt")
    text = f"""\
name: tiny-test
version: "0.0.1"
intended_use: "test: random weights, not for clinical use"
provenance: {{command: tests/models.py}}
segmentation:
  {{name: lungs, version: "1", architecture: unet, input_size: 64, base_channels: 4, depth: 3,
   weights: unet.pt, sha256: {sha256_file(folder / "unet.pt")}}}
classifier:
  input_size: 64
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
  region: crop+mask
  threshold: 0.5
  explain: {{member: squeeze}}
  members:
    - {{name: squeeze, version: "1", architecture: squeezenet1_1, weights: squeeze.pt,
       sha256: {sha256_file(folder / "squeeze.pt")}}}
"""
    path = folder / "manifest.yaml"
    path.write_text(text)
    load_manifest(path)  # the file must be valid
    return path
