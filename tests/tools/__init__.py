"""The tools around the gateway: the ``trio-gateway`` CLI, chat, check, demo runtime, dev auth
and packaging."""
