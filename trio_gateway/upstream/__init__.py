"""The client of the Agent Runtime: the keep-alive connection pool (h11), the SSE decoder and
the turn streaming on top of them."""
