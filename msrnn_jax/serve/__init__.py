"""Serving: `engine` (continuous batching over one fixed-shape state: the jitted programs,
requests and the scheduler; no HTTP) and `server` (the OpenAI-compatible HTTP layer)."""
