"""The installed package as a user imports it: one namespace, the SDK at the top, nothing heavy on import."""

import ast
import subprocess
import sys
from pathlib import Path


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
    """Installed, our `models` or `server` is not a top-level module: only `fewstep` is. (Another distribution
    may own such a name: transformers now depends on Hugging Face's `kernels`; it must not resolve to our folder.)"""
    root = Path(__file__).resolve().parents[1]
    names = ("models", "server", "training", "kernels", "clients")
    code = f"import importlib.util as u; print([(n, s.origin) for n in {names!r} if (s := u.find_spec(n))])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    found = ast.literal_eval(out.stdout.strip())
    assert [(n, o) for n, o in found if o is None or Path(o).resolve().is_relative_to(root / n)] == []
