"""The tools around the gateway: ``trio-gateway`` CLI, chat, check, demo runtime, dev auth, packaging."""
