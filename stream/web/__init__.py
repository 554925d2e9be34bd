"""The HTTP side: the Starlette app and its routes, status endpoints, the session API, uvicorn."""
