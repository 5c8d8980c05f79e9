"""The library version, in one place (pyproject.toml reads it; nothing imports the package root for it)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
