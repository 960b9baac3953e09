"""Ground truth in: the sites' final findings by CSV, HL7 v2 (ORU^R01 over MLLP) and FHIR R4, mapped and recorded."""
