"""``labcloud admin``: the user API's ``/admin/`` routes from a terminal.

``client`` makes the HTTP calls, ``formatting`` turns answers into tables,
``commands`` holds the subcommands, their options and exit codes."""
