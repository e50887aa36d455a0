"""The ``labcloud`` command: the tools people run in a terminal, apart from the
services and the contracts they share.

Each group of subcommands lives in a subpackage with a ``register`` function that adds
its commands to the top-level parser (``labcloud_cli.main``): ``stack`` (``up``,
``runner``, ``demo-image``) starts processes with ``python -m <service>``; ``admin``
talks to a running user API over HTTP. Nothing here imports the services' internals:
what the tools share with the services is ``labcloud`` (the contract's enums, password
rules, key generation).
"""
