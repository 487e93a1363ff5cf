"""The models at work: engine.py (decoding threads, the prediction head thread, load and
admission signals), transcriber.py (Whisper), remote.py + worker.py + consumer.py (the same work in
worker processes fed through Redis: the command line, then the job loop)."""
