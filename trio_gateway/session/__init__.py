"""The session engine: sessions, their connections, turns, resume, replicas and drain.

Modules import one way, each only those below it::

    manager.py      SessionManager: the registry of sessions, refusal, the door, drain
    connection.py   Connection: one socket and its tasks (reader, writer, guard, catch-up)
    session.py      Session: turns, numbering, approvals, attached sockets, grace
    replicas.py     the session's lease: several replicas (SessionLease) or one (SoloLease)
    transport.py, outbound.py, replay.py, turn_queue.py, detached.py   the parts
"""
