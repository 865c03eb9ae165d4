"""IPAM's errors: every failure is an IPAMError whose str() is one line for the user."""

from __future__ import annotations


class IPAMError(Exception):
    """Base of every IPAM failure."""


class PoolExhaustedError(IPAMError):
    """No free address in the pools that may serve the request."""


class BlockLimitError(IPAMError):
    """The node owns maxBlocksPerHost blocks and may not claim another."""


class NoQualifiedPoolError(IPAMError):
    """No enabled pool selects the node, or a requested pool is missing, disabled or not for it."""


class StrictAffinityError(IPAMError):
    """A specific address was requested in another node's block while strict affinity is on."""


class AddressInUseError(IPAMError):
    """A specific address was requested that is already allocated."""


class StaleReleaseError(IPAMError):
    """A guarded release found the address assigned again (another handle or sequence number)."""


class InvalidConfigError(IPAMError):
    """An IPAM configuration Calico's SetIPAMConfig would refuse."""


class TooManyConflictsError(IPAMError):
    """A compare-and-swap kept losing races with other writers (bounded retries ran out)."""


class HandleInUseError(IPAMError):
    """auto_assign(new_handle=True) found the handle already there (its holder is asking again)."""
