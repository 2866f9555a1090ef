"""The OpenAI-compatible server: api_server.py (the app), protocol.py (request bodies), tool_parsers.py, reasoning.py."""
