"""The job queue: enqueue, lease, keep-alive, transitions, reaping, cancellation."""
