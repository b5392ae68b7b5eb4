"""The OpenAI-compatible HTTP server, job queues, engine and workers."""
