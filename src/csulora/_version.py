"""The package version, in a module that imports nothing (the CLI and the build read it from here)."""

__version__ = "0.1.0"
