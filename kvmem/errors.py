"""Errors caused by the user's input: the CLI prints them as one line and exits with code 2."""


class KvmemError(Exception):
    """Bad input or an unsupported model: a message for the user, not a bug."""
