"""The sans-I/O core: numpy only, no asyncio, no sockets; tested with arrays. It imports nothing
from the rest of the server."""
