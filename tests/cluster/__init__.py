"""Shared state and several replicas or workers: Redis, replicas, ``serve --workers``."""
