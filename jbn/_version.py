"""The version of jbn, in one place: pyproject.toml reads it (setuptools' dynamic `attr`)."""

__version__ = "0.2.0"
