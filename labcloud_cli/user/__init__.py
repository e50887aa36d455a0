"""The users' commands: log in, files, jobs (``labcloud login``, ``upload``, ``run``...)."""
