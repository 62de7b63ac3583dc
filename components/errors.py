"""The one exception type the adapters turn into a single clear line."""


class GraftlineError(Exception):
    """Bad input or environment the user can fix; the message says how."""
