"""Hostile input: fuzzing, smuggling, lockouts and the HTTP/WebSocket edge."""
