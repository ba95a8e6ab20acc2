"""Sans-IO tests: the protocol, SSE decoding, queues, windows, limits and settings, without
sockets."""
