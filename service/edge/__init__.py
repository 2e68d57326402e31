"""The HTTP edge: ASGI middlewares that admit, authenticate, size-limit and count requests."""
