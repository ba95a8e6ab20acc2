"""Helpers shared by the tests and the benchmarks, each written once: free ports, child
processes, a raw WebSocket client, redis-server and nginx launchers, the scripted and keep-alive
runtimes, the JWKS server, IDE frames and the fuzzing harnesses.

Fixtures stay in ``tests/conftest.py``; nothing here imports a test module.
"""
