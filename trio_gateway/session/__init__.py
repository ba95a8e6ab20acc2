"""The session engine: sessions, their connections, turns, resume, replicas and drain.

Modules import one way (each only those below it)::

    session.py    SessionManager, Connection, Session (split further in later steps)
    replicas.py   a session across replicas: lease, follow, hand-off
    transport.py, outbound.py, replay.py, turn_queue.py, detached.py   the parts
"""
