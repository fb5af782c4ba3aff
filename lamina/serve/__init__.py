"""The OpenAI-compatible HTTP server: protocol models (protocol.py) and the app around an Engine (app.py)."""
