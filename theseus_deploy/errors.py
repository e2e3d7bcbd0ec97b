"""Errors that the CLI turns into a one-line message and exit code 2.

Library code raises `UsageError` for anything the *user* got wrong (a missing file, an
unknown task, a model with the wrong number of labels ...). Bugs stay ordinary exceptions so
that they keep their traceback.
"""


class UsageError(Exception):
    """Bad input from the user: the CLI prints `error: <message>` and exits with code 2."""
