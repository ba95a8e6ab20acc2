"""The doors of the gateway: the WebSocket handshake, the REST proxy, the checks every HTTP
request passes first, and the client's address."""
