"""Errors that describe a user's mistake; entry points print them without a traceback."""


class UserError(ValueError):
    """Bad input from the user: a config key, a name, a path. The message says what is allowed."""
