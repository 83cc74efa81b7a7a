"""`edgellm serve`: an OpenAI-compatible HTTP server with continuous batching (engine.py) and prefix reuse."""
