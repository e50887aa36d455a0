"""``python -m labcloud_cli``: the same program as the ``labcloud`` command."""

from labcloud_cli.main import main

raise SystemExit(main())
