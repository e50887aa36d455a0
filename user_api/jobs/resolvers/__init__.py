"""Job creation, first step: resolvers turn a request into a ``JobDraft``
(``user_api.jobs.drafts``), one module per way of creating jobs.

A resolver checks the request against what it refers to (a catalog entry, the
user's files) and expands it; it raises the domain errors that become the request's
4xx answers, and writes nothing. It does all its slow work (storage look-ups) itself,
so that ``submit`` runs only the short write transaction after it.
"""
