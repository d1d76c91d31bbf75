"""Settings precedence and errors. `fewstep serve` started as a user starts it, then SIGTERM: test_shutdown.py."""

import pytest

from fewstep.server.settings import load_settings


def test_flags_beat_environment_beat_file(tmp_path, monkeypatch):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 9000\nmax_batch: 4\nqueue_size: 7\n")
    monkeypatch.setenv("FEWSTEP_MAX_BATCH", "16")
    monkeypatch.setenv("FEWSTEP_API_KEYS", "a, b")
    s = load_settings(cfg, queue_size=3, host=None)
    assert (s.port, s.max_batch, s.queue_size, s.api_keys) == (9000, 16, 3, ["a", "b"])


def test_bad_settings_are_clear_errors(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("max_batch: 0\n")
    with pytest.raises(ValueError, match="max_batch"):
        load_settings(cfg)
    cfg.write_text("colour: red\n")
    with pytest.raises(ValueError, match="colour"):
        load_settings(cfg)
    with pytest.raises(ValueError, match="not found"):
        load_settings(tmp_path / "missing.yaml")
