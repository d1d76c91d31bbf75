"""fewstep: distil many-step flow image models into 1-4-step students and serve them.

The layers install under this one namespace: ``fewstep.models`` (what training and serving share),
``fewstep.kernels``, ``fewstep.training``, ``fewstep.server`` and ``fewstep.clients`` (docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AsyncFewstepClient", "FewstepClient", "FewstepError", "__version__"]

if TYPE_CHECKING:
    from fewstep.clients import AsyncFewstepClient, FewstepClient, FewstepError


def __getattr__(name: str) -> Any:
    # the SDK is imported on first use, so `import fewstep` (the CLI, the server) does not pay for httpx
    if name in ("FewstepClient", "AsyncFewstepClient", "FewstepError"):
        from fewstep import clients

        return getattr(clients, name)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
