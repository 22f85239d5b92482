"""The errors a step may raise. A step raises either a ``ProviderError`` (from
``providers.base``, with ``retryable``) or a :class:`StepError`; the engine catches only those
two. Anything else is a crash: counted against the row's crash budget, retried with backoff,
and after ``engine.max_crashes`` the row ends FAILED with the refunds its state owes."""

from __future__ import annotations


class LeaseLost(Exception):
    """The row was archived or taken over; the step's writes were rolled back."""


class StepError(Exception):
    """A step failed for a reason the gateway can name and tell the client (a dataset that
    cannot be prepared, weights that are not a LoRA, an image that does not decode). It is not
    a bug. ``retryable``: another attempt (another provider, or the same step later) may work."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable
