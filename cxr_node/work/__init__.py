"""The worker stage: a job from queued to written (load, analyse, retrieve, record, write), and the library."""
