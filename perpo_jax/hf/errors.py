"""Errors a user can cause with a checkpoint or config (each names the tensor/file/key)."""


class CheckpointError(ValueError):
    """A checkpoint cannot be imported/exported: missing, unexpected or wrongly shaped
    tensors, unreadable files, or an unsupported architecture. Raised before any weight is
    loaded, so there is never a half-loaded model."""


class AnyresNotSupportedError(CheckpointError, NotImplementedError):
    """The config needs LLaVA-NeXT/OneVision anyres image tiling, which is not supported yet."""
