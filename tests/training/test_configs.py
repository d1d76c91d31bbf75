"""Every shipped distillation config parses under the fields and types the CLI validates it against, so a typo in
a recipe's settings is caught here and not after a teacher-data pass."""

from pathlib import Path

import pytest

from fewstep.training.config import load_config
from fewstep.training.distill.config import DistillConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("distill-*.yaml"))


def test_the_configs_are_found():
    assert len(CONFIGS) >= 6


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_distill_config_parses(path):
    cfg = load_config(DistillConfig, path)
    assert path.stem.startswith(f"distill-{cfg.method}")
