"""The clients are tested against the same tiny served models and live server as the server tests."""

from tests.server.conftest import live, models_dir  # noqa: F401  (fixtures)
