"""`grym-stream`, the command: the one module that knows the server, the clients and the
benchmarks together (the `stream` package imports neither of the other two)."""
