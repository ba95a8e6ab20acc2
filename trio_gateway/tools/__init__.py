"""The tools around the gateway, never imported by the server itself.

``trio-gateway chat`` (a terminal client), ``check`` (configuration and dependency checks), the
demo's in-memory Agent Runtime and its Auth Service (a dev token issuer with its JWKS server).
The commands in ``cli.py`` start them, and tests and benchmarks use them as real peers.
"""
