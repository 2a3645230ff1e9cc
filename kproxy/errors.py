"""The one exception type a user sees: a one-line message, non-zero exit."""


class KproxyError(Exception):
    """A problem with the user's input or the machine, said in one line."""
