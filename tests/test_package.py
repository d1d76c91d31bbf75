"""The installed package as a user imports it: one namespace, the SDK at the top, nothing heavy on import."""

import subprocess
import sys


def test_the_sdk_is_importable_from_the_top():
    from fewstep import AsyncFewstepClient, FewstepClient, FewstepError
    from fewstep.clients.sdk import FewstepClient as Direct

    assert FewstepClient is Direct and AsyncFewstepClient.__name__ == "AsyncFewstepClient"
    assert issubclass(FewstepError, Exception)


def test_import_fewstep_loads_neither_torch_nor_httpx():
    code = "import sys, fewstep; print(sorted(m for m in ('torch', 'httpx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_top_level_layer_names_are_importable_from_elsewhere(tmp_path):
    """Installed, `models` or `server` is not a top-level module: only `fewstep` is."""
    names = ("models", "server", "training", "kernels", "clients")
    code = f"import importlib.util as u; print([n for n in {names!r} if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"
