"""Who may do what: token verification (``auth.py``: JWT against the Auth Service's JWKS),
the limits every client is held to (``limits.py``: sans-IO buckets, counters, Origin policy)
and the security layer of an app that combines them (``security.py``)."""
