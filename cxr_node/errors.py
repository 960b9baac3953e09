"""The exception tree: every error the node raises on purpose is a :class:`CxrNodeError`."""

from __future__ import annotations


class CxrNodeError(Exception):
    """Base of every error the node raises on purpose.

    The CLI turns any of these into one line on stderr and :attr:`exit_code`.
    """

    exit_code = 1


class ConfigError(CxrNodeError):
    """The configuration file or environment is wrong; the message names the file and the key."""

    exit_code = 2


class StorageError(CxrNodeError):
    """The durable store (files or jobs database) could not do what was asked."""

    exit_code = 3


class InvalidTransition(StorageError):
    """A job was asked to move to a state its current state does not lead to."""


class RejectedInstance(CxrNodeError):
    """A received instance is refused with a DIMSE ``status`` and a human ``reason``.

    Parameters
    ----------
    status : int
        The C-STORE response status (a constant of :mod:`cxr_node.dicom.status`).
    reason : str
        Why, in one line; sent to the peer as the ErrorComment (truncated to 64 characters).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ModelError(CxrNodeError):
    """A model could not be loaded or run (missing weights, checksum mismatch, bad manifest)."""

    exit_code = 4


class SendError(CxrNodeError):
    """A destination could not be reached or refused what was sent."""

    exit_code = 5


class PixelDecodeError(CxrNodeError):
    """An image's pixel data cannot be turned into a greyscale array (absent, colour, multi-frame, undecodable)."""
