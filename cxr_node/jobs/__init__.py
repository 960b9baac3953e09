"""The durable store: jobs and their state machine, spool files, recovery on start."""

from cxr_node.jobs.states import JobState
from cxr_node.jobs.store import Job, JobStore, NewJob, SqliteJobStore, StoredResult

__all__ = ["Job", "JobState", "JobStore", "NewJob", "SqliteJobStore", "StoredResult"]
