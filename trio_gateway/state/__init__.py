"""The state an app keeps beyond one process's memory, behind backend-neutral interfaces.

``state.py`` and ``ownership.py`` are the interfaces and their in-memory versions; the SQLite
file (``sqlite_store.py``, the default) and Redis (``redis_state.py``, ``redis_stores.py``)
implement them, and ``cluster.py`` carries sessions across replicas on Redis.
"""
