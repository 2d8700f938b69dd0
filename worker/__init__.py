"""The outbox-worker process: claims outbox rows and ships them to sinks."""
