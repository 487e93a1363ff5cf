"""`python -m streamer.worker` still starts a remote inference worker: streamer/infer/worker.py."""

import sys

from streamer.infer.worker import main

if __name__ == "__main__":
    sys.exit(main())
