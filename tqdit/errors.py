"""Errors caused by the user's input (config, files): reported as one line naming the problem and the fix."""


class TqditError(Exception):
    """Bad input. The message says what is wrong and how to fix it; entry points print it without a
    traceback."""
