"""trio-gateway: a structured-concurrency gateway between AI-coding IDEs and an Agent Runtime."""

__version__ = "0.1.0"
