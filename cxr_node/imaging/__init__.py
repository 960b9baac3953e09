"""Pure numpy image maths shared by the stages: resampling and the geometry of masks (no I/O, torch or DICOM)."""
