"""`python -m streamer.export` still exports the durable event log: streamer/events/export.py."""

import sys

from streamer.events.export import main

if __name__ == "__main__":
    sys.exit(main())
