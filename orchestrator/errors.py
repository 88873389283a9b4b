"""Errors shared by every stage: each carries a one-line message naming the key, file or line at fault."""


class OrchestratorError(Exception):
    """Base class: a user-facing error whose message is one line and names what is wrong."""


class ConfigError(OrchestratorError, ValueError):
    """A config value is missing, unknown, of the wrong type or inconsistent. Names the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class DataError(OrchestratorError, ValueError):
    """Input data cannot be used. Names the file (and line or byte offset when known)."""

    def __init__(self, path: str, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
