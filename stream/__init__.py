"""grym-stream: a real-time audio analysis-and-generation server."""

__version__ = "0.1.0"
