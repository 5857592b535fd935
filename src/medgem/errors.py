"""User-facing errors.

Every failure a user can cause (a bad file, a bad prompt, a bad flag) raises a subclass of
`MedgemError` whose message says what is wrong and, where possible, what to do. The faces map them
to exit code 2 (CLI) and 4xx (HTTP). Messages must never contain prompt text or patient data.
"""

from __future__ import annotations


class MedgemError(Exception):
    """Base class: an error caused by input, with a message meant for the user."""

    http_status = 400


class CheckpointError(MedgemError):
    """A checkpoint is missing, truncated, or does not match its config."""


class InputError(MedgemError):
    """A prompt, image, DICOM or FHIR input is invalid."""


class ContextLengthError(InputError):
    """A prompt does not fit in the model's context window."""


class ConfigError(MedgemError):
    """A config.json or GGUF metadata block cannot be understood."""


class CapabilityError(MedgemError):
    """The loaded model cannot do what was asked (e.g. images on a text-only model)."""
