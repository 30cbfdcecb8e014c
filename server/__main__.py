"""``python -m rnnserve.server ...``: the rnnserve command line."""

from rnnserve.server.cli import main

main()
