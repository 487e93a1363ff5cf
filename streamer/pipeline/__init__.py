"""A session's audio becoming events, synchronous where it can be: session.py (PCM decoding,
numbering, latency), segmenter.py (VAD -> utterances), runner.py (utterances -> inference jobs ->
events, interim results), context.py (the dialogue cache the model reads)."""
