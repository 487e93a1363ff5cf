"""The models at work: engine.py (decoding threads, the prediction head thread, load and
admission signals), transcriber.py (Whisper), remote.py + worker.py (the same work in worker
processes fed through Redis)."""
