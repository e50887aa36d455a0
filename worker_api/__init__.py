"""The worker API: the queue service that workers pull jobs from (port 8001)."""
