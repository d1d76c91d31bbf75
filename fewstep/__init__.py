"""fewstep: distil many-step flow image models into 1-4-step students and serve them.

The layers install under this one namespace: ``fewstep.models`` (what training and serving share),
``fewstep.kernels``, ``fewstep.training``, ``fewstep.server`` and ``fewstep.clients`` (docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


def _unshadow_installed_packages() -> None:
    """Run from a checkout's root (``python -m pytest``, ``python -m fewstep.cli``), the root is on sys.path, and
    its top-level folders, which install as ``fewstep.kernels`` and so on, shadow installed packages of the same
    names: Hugging Face's ``kernels``, which transformers (a dependency) imports whenever its distribution is
    installed, would resolve to our ``kernels/`` folder and break ``import transformers``. The installed one is
    imported first, with the root left out of the search path; elsewhere this does nothing."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = None if "kernels" in sys.modules else importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent.parent != root:
        return  # already imported, absent, or not ours
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    except Exception:  # not installed (or broken): transformers will not find a distribution and skip it
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved


_unshadow_installed_packages()
__all__ = ["AsyncFewstepClient", "FewstepClient", "FewstepError", "__version__"]

if TYPE_CHECKING:
    from fewstep.clients import AsyncFewstepClient, FewstepClient, FewstepError


def __getattr__(name: str) -> Any:
    # the SDK is imported on first use, so `import fewstep` (the CLI, the server) does not pay for httpx
    if name in ("FewstepClient", "AsyncFewstepClient", "FewstepError"):
        from fewstep import clients

        return getattr(clients, name)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
