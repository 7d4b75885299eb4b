"""The exceptions a user of the library is expected to catch.

Every problem with user input (an audio file, a checkpoint folder, a setting) is raised as one of these,
with a message meant for a person, so that the CLI and the app can print it instead of a traceback.
"""


class EdgeASRError(Exception):
    """Base class of every error this project raises on purpose."""


class AudioError(EdgeASRError, ValueError):
    """The audio could not be used: missing, empty, silent, corrupt, not audio, or holding NaN/inf samples."""


class CheckpointError(EdgeASRError):
    """A model folder is missing, truncated, or does not match its config."""


class SettingsError(EdgeASRError, ValueError):
    """A setting (compression knob, recipe, training option) is out of range or unknown.

    ``setting``: the library's name of it (e.g. "freeze_layers"), so a front end can name its own control
    (the CLI: ``--freeze-layers``) without the library knowing about flags."""

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting
