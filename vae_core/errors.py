"""Errors the library raises; typed so they cross process boundaries (Ray) intact.

Every one is a `VAEError`: what a user can fix (the message says what), as opposed to a bug.
"""


class VAEError(Exception):
    """Base of the errors that name a problem in the user's input, data or configuration."""


class IngestError(VAEError, RuntimeError):
    """The run cannot produce a dataset (mixed shapes, too much quarantined, nothing usable)."""


class TrainError(VAEError, RuntimeError):
    """Training could not produce a model; the message says why and what to change."""


class NonFiniteLossError(TrainError):
    """The loss became NaN or infinite; training stops rather than write garbage weights."""


class ConfigError(VAEError, ValueError):
    """A preset or override names a key the config does not have, or gives a key a value it cannot take."""


class EvaluateError(VAEError, RuntimeError):
    """A model cannot be evaluated as asked: a dataset it does not fit, an empty split, a gate metric that
    was not computed. The message names the values."""


class ModelNotFoundError(VAEError, LookupError):
    """A registered model, alias or version that does not exist; the message lists what does."""


class EncodeError(VAEError, RuntimeError):
    """A dataset cannot be encoded as asked: a model that does not fit it, empty splits, too few resources."""


class StorageUnavailableError(ConnectionError):
    """An object store that did not answer through every retry (`vae_core.s3`); the message names the object
    and the last error."""
