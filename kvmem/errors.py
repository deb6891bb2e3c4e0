"""Errors caused by the user's input: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class KvmemError(Exception):
    """Bad input or an unsupported model: a message for the user, not a bug.

    ``param`` names the library parameter at fault (``top``, ``n_neurons``); its message then starts with that
    name ("top must be at least 1"), and the CLI puts the command's flag in its place ("--top must be at least
    1", ``KvmemError.for_flag``), so a notebook user reads the parameter and a shell user the flag."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def for_flag(self, flags: dict[str, str] | None = None) -> str:
        """The message with ``param`` replaced by its flag: ``flags[param]``, else --param-with-dashes."""
        text = str(self)
        if not self.param:
            return text
        flag = (flags or {}).get(self.param) or "--" + self.param.replace("_", "-")
        return flag + text[len(self.param):] if text.startswith(self.param) else f"{flag}: {text}"
