"""The package version, in a leaf that every module may import."""

__version__ = "0.1.0"
