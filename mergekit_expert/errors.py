"""The one error type the plugin raises for problems a user can fix."""


class ExpertMergingError(ValueError):
    """Bad configuration, data or inputs; the message names the problem and the fix."""
