"""Errors with a message a robot operator can act on.

Every failure the library can predict raises a subclass of `MobileVLMError`, so callers (the CLI, the ROS node)
catch one type and report `str(error)` as the reason.
"""


class MobileVLMError(Exception):
    """Base class of every expected failure: bad model files, bad input, impossible requests."""


class ConfigError(MobileVLMError):
    """A checkpoint's config.json is missing, unreadable or describes a model we cannot build."""


class CheckpointError(MobileVLMError):
    """Weight files are missing, corrupt, or do not match the model the config describes."""


class ImageError(MobileVLMError):
    """An input image is empty, has the wrong shape or type, or cannot be decoded."""


class PromptError(MobileVLMError):
    """A question or generation request is empty, too long, or otherwise cannot be answered."""


class ArtifactError(MobileVLMError):
    """A built artifact (GGUF, engine) is missing, stale or corrupt and may not be rebuilt, or building it failed."""


class BackendError(MobileVLMError):
    """A runtime backend cannot serve a request: its sequences or memory are used up, or the runtime failed."""
