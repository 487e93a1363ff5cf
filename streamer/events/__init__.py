"""Where events go once published: fanout.py (subscribers, replay buffers), store.py (the
durable SQLite log) + export.py, bus.py (other instances over Redis Streams)."""
