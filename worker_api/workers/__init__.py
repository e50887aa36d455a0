"""Which workers are connected, and what they offer (``presence``), for a queued
job's waiting reason (``worker_api.queue.waiting``) and the admins' list of workers."""
