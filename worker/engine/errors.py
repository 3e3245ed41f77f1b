"""Errors the engine raises; each message names what was wrong so a caller can show it as is."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class EngineInputError(EngineError, ValueError):
    """The caller's input (photos, model, config) is unusable; the message names the problem."""


class PhotosUnusable(EngineInputError):
    """None of the subject's photos can be trained on; the message names each photo and why."""


class TrainingDiverged(EngineError):
    """The loss became non-finite; nothing from the diverged run is saved."""


class Cancelled(EngineError):
    """The caller's cancel check asked the run to stop."""
