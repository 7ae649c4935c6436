"""The library's version: a leaf module (it imports nothing), so any module may read it without an upward import."""

__version__ = "0.1.0"
