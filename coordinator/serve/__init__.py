"""OpenAI-compatible HTTP serving: a continuous-batching scheduler over one Engine, and its ASGI app."""
