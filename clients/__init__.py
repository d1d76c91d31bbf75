"""Clients of the fewstep server: the Python SDK (``from fewstep import FewstepClient``)."""

from fewstep.clients.sdk import AsyncFewstepClient, FewstepClient, FewstepError, GenerateResult

__all__ = ["AsyncFewstepClient", "FewstepClient", "FewstepError", "GenerateResult"]
