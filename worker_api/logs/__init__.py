"""Live logs: runners ship a running job's output here in chunks, the user API
reads it back (``service``, ``endpoints``)."""
