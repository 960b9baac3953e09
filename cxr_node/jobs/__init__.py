"""The durable store: typed states and records, the store Protocols and their backends, spool files, the codec."""

from cxr_node.jobs.interfaces import DeliveryStore, JobStore, ResultStore, Store
from cxr_node.jobs.records import Job, NewJob, Output, StoredResult
from cxr_node.jobs.states import DeliveryState, JobState

__all__ = [
    "DeliveryState",
    "DeliveryStore",
    "Job",
    "JobState",
    "JobStore",
    "NewJob",
    "Output",
    "ResultStore",
    "Store",
    "StoredResult",
]
