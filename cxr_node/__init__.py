"""cxr-node: a DICOM node that brings chest X-ray AI into a hospital's PACS."""

__version__ = "0.1.0"
