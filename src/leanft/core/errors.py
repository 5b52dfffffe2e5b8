"""The one exception type leanft raises for bad user input."""


class LeanftError(ValueError):
    """A user-facing error: one clear line saying what to do."""
