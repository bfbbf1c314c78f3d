"""ditq's exceptions. Every error a user can cause is a DitqError with a message that names the file,
tensor or shape involved and says what to do about it."""


class DitqError(Exception):
    """Base class of every error ditq raises on purpose."""


class FormatError(DitqError, ValueError):
    """An unknown format name, or a format that cannot apply to this tensor."""


class ShapeError(DitqError, ValueError):
    """A tensor's shape does not suit the requested operation (e.g. block formats need N, K % 128 == 0)."""


class NonFiniteError(DitqError, ValueError):
    """A weight holds NaN or Inf and cannot be quantized."""


class CheckpointError(DitqError):
    """A checkpoint file is missing, truncated, corrupt or holds something ditq cannot read."""


class UnsupportedFormatError(CheckpointError):
    """A file uses a quantization variant ditq does not implement (it refuses rather than load it wrongly)."""
