"""A complete LabCloud on one machine (``labcloud up``), one more runner
(``labcloud runner``) and the demo tool's image (``labcloud demo-image``).

``commands`` holds the subcommands; ``setup`` what a stack keeps in its data folder
(secrets, runner accounts and their settings files) and the port check; ``processes``
starts, watches and stops the services, each as ``python -m <service>``;
``aws_emulator`` runs moto's server and creates the AWS resources of
``--aws-emulator`` on it, ``aws_batch`` those of ``--backend aws-batch``; ``env_file``
reads and checks ``--env-file``."""
