"""The one exception type the adapters turn into a single clear line."""


class GraftlineError(Exception):
    """Bad input or environment the user can fix; the message says how."""


class FailedWithOutputs(GraftlineError):
    """A stage that made all its outputs and then failed a check on them (evaluate's thresholds): the
    outputs replace the last set, so a person can look at what failed; DVC records no run."""
