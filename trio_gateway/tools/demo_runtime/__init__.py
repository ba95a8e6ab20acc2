"""An in-memory Agent Runtime that speaks the real contract (docs/compatibility.md §1).

The gateway, its tests, its benchmark and ``trio-gateway demo`` talk to this runtime over real
HTTP, so it implements the whole upstream surface: the SSE turn stream
(``POST /agent/message/stream``) with every chunk field present, the coding flow with tool calls
and human approval, agent switching, a ``bench N [R]`` mode for throughput measurements, and the
REST routes for sessions, agents and metrics. Everything is bounded: sessions (least recently
active evicted), history per session, pending calls per session, the audit log and the recorded
stream requests.

``state.py`` is its memory, ``agent.py`` the scripted agent that plays the turns, ``app.py``
the HTTP/SSE app that serves them.
"""

from .app import DemoRuntime, create_demo_runtime, serve_demo_runtime
from .state import AGENTS, DemoRuntimeConfig

__all__ = [
    "AGENTS",
    "DemoRuntime",
    "DemoRuntimeConfig",
    "create_demo_runtime",
    "serve_demo_runtime",
]
