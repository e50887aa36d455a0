"""Administration: accounts, groups, limits, worker accounts, the queue, the
catalog's status, and the audit log of every change admins make."""
