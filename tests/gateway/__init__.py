"""The gateway served on loopback: relay, turns, sessions, auth, REST proxy, runtime client,
observability."""
