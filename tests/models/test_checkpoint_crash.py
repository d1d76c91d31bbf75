"""Crash safety of save_checkpoint: a crash at any step of a save leaves the old or the new checkpoint whole.

A crash is simulated by making one call inside fewstep.models.checkpoint (safetensors' save_file, os.rename,
os.replace, os.fsync, shutil.rmtree) raise at its k-th call; nothing in the module catches that exception,
so the files are left exactly as a killed process would leave them (short of a torn write).
"""

import errno
import os

import pytest
import torch

from fewstep.models import checkpoint
from fewstep.models.checkpoint import CheckpointError, load_weights, read_card, save_checkpoint, verify_file

WEIGHTS = ("a.safetensors", "b.safetensors")
NOTES = "notes.txt"
OLD, NEW = 1, 2


class Crash(Exception):
    """The simulated crash."""


def _linear(value: float) -> torch.nn.Linear:
    m = torch.nn.Linear(2, 3)
    with torch.no_grad():
        m.weight.fill_(value)
        m.bias.fill_(value)
    return m


def _save(d, version, overwrite=True):
    card = {"name": "tiny", "role": "classifier", "model": {"in": 2, "out": 3}, "metrics": {"version": version}}
    weights = {name: _linear(version) for name in WEIGHTS}
    return save_checkpoint(d, card, weights, {NOTES: f"version {version}\n"}, dtype="float32", overwrite=overwrite)


def _load(d) -> int:
    """The version of the checkpoint at ``d``, after checking every file belongs to that one version."""
    card = read_card(d)
    version = card.metrics["version"]
    for name in WEIGHTS:
        m = torch.nn.Linear(2, 3)
        load_weights(d, card, name, m)
        assert torch.equal(m.weight, torch.full((3, 2), float(version))), name
        assert torch.equal(m.bias, torch.full((3,), float(version))), name
    assert verify_file(d, card, NOTES).read_text() == f"version {version}\n"
    return version


def _leftovers(d):
    return sorted(p.name for p in d.parent.iterdir() if p.name != d.name)


# Where each function is called (and which monkeypatch target replaces it).
TARGETS = {
    "save_file": (checkpoint, "save_file"),
    "fsync": (checkpoint.os, "fsync"),
    "replace": (checkpoint.os, "replace"),
    "rename": (checkpoint.os, "rename"),
    "rmtree": (checkpoint.shutil, "rmtree"),
}


def _crash_at(mp, function, k):
    """Make ``function`` raise Crash at its k-th call (k=0: never; just count). Returns the call counter."""
    owner, attr = TARGETS[function]
    real = getattr(owner, attr)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            raise Crash(f"{function} call {k}")
        return real(*args, **kwargs)

    mp.setattr(owner, attr, wrapper)
    return calls


def _crashed_save(monkeypatch, d, function, k):
    with monkeypatch.context() as mp:
        calls = _crash_at(mp, function, k)
        with pytest.raises(Crash):
            _save(d, NEW)
    assert calls[0] == k


@pytest.mark.parametrize(
    ("function", "k", "survivor"),
    [
        pytest.param("save_file", 1, OLD, id="during-first-weights"),
        pytest.param("save_file", 2, OLD, id="during-second-weights"),
        pytest.param("replace", 1, OLD, id="during-card-write"),
        pytest.param("rename", 1, OLD, id="after-staging-before-moving-old-aside"),
        pytest.param("rename", 2, NEW, id="between-the-two-renames"),
        pytest.param("rmtree", 1, NEW, id="before-removing-old"),
    ],
)
def test_a_crash_over_an_existing_checkpoint_leaves_one_whole(tmp_path, monkeypatch, function, k, survivor):
    d = tmp_path / "m"
    _save(d, OLD, overwrite=False)
    _crashed_save(monkeypatch, d, function, k)
    assert _load(d) == survivor
    assert _leftovers(d) == []
    _save(d, 3)
    assert _load(d) == 3
    assert _leftovers(d) == []


@pytest.mark.parametrize("first_save", [False, True], ids=["over-old", "first-save"])
@pytest.mark.parametrize("function", list(TARGETS))
def test_every_crash_point_of_every_step(tmp_path, monkeypatch, function, first_save):
    """Crash at each call, in turn, of each function a save makes: before the commit point the old
    checkpoint (or none) survives, from it on the new one; nothing is left behind once read."""
    count = tmp_path / "count"
    if not first_save:
        _save(count / "m", OLD)
    with monkeypatch.context() as mp:
        calls = _crash_at(mp, function, 0)
        _save(count / "m", NEW)
    if function != "rmtree" or not first_save:  # a first save has no old checkpoint to remove
        assert calls[0] > 0, f"a save makes no {function} call: the crash points are not what this test thinks"
    outcomes = []
    for k in range(1, calls[0] + 1):
        d = tmp_path / f"{k}" / "m"
        if not first_save:
            _save(d, OLD)
        _crashed_save(monkeypatch, d, function, k)
        if first_save:
            try:
                outcomes.append(_load(d))
            except CheckpointError as e:
                assert "no such checkpoint directory" in str(e)
                outcomes.append(None)
        else:
            outcomes.append(_load(d))
        assert _leftovers(d) == [], k
        _save(d, 3)
        assert _load(d) == 3
        assert _leftovers(d) == []
    assert outcomes == sorted(outcomes, key=lambda v: v == NEW), f"the new checkpoint came and went: {outcomes}"


@pytest.mark.parametrize(
    ("function", "k"),
    [pytest.param("save_file", 1, id="during-weights"), pytest.param("replace", 1, id="during-card-write")],
)
def test_a_crashed_first_save_leaves_nothing_and_a_retry_works(tmp_path, monkeypatch, function, k):
    d = tmp_path / "m"
    _crashed_save(monkeypatch, d, function, k)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        read_card(d)
    assert _leftovers(d) == []
    _save(d, NEW, overwrite=False)
    assert _load(d) == NEW
    assert _leftovers(d) == []


def test_a_first_save_crashed_after_its_card_is_finished_by_recovery(tmp_path, monkeypatch):
    d = tmp_path / "m"
    _crashed_save(monkeypatch, d, "rename", 1)  # the only rename of a first save: staging -> place
    assert _load(d) == NEW
    with pytest.raises(CheckpointError, match="already exists"):
        _save(d, 3, overwrite=False)


def test_the_next_save_recovers_before_refusing_or_overwriting(tmp_path, monkeypatch):
    d = tmp_path / "m"
    _save(d, OLD)
    _crashed_save(monkeypatch, d, "rename", 2)  # old aside, new staged, nothing in place
    assert not d.exists()
    with pytest.raises(CheckpointError, match="already exists"):
        _save(d, 3, overwrite=False)
    assert _load(d) == NEW


def test_reading_an_intact_checkpoint_writes_nothing(tmp_path, monkeypatch):
    """A read-only models directory: reading needs no write when nothing needs recovering."""
    d = tmp_path / "m"
    _save(d, OLD)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "read-only file system")

    with monkeypatch.context() as mp:
        for owner, attr in [*TARGETS.values(), (checkpoint.os, "unlink"), (checkpoint.os, "rmdir")]:
            mp.setattr(owner, attr, refuse)
        os.chmod(tmp_path, 0o555)  # not enforced for root, hence the patches above
        try:
            assert _load(d) == OLD
        finally:
            os.chmod(tmp_path, 0o755)


def test_an_unremovable_leftover_does_not_stop_reading(tmp_path, monkeypatch):
    d = tmp_path / "m"
    _save(d, OLD)
    _crashed_save(monkeypatch, d, "rmtree", 1)  # new in place, .m.old left

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "read-only file system")

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint.shutil, "rmtree", refuse)
        assert _load(d) == NEW
    assert _leftovers(d) == [".m.old"]
    assert _load(d) == NEW
    assert _leftovers(d) == []


def test_a_missing_checkpoint_that_cannot_be_restored_is_one_clear_error(tmp_path, monkeypatch):
    d = tmp_path / "m"
    _save(d, OLD)
    _crashed_save(monkeypatch, d, "rename", 2)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "read-only file system")

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint.os, "rename", refuse)
        with pytest.raises(CheckpointError, match=r"\.m\.new.*cannot be moved into place"):
            read_card(d)
    assert _load(d) == NEW


@pytest.mark.skipif(checkpoint.fcntl is None, reason="no flock on this platform")
def test_recovery_leaves_a_save_in_progress_alone(tmp_path):
    """A staging directory without a card is a crash's leftover, or a save still writing: while a save
    holds the lock, reading the checkpoint in place must not delete it."""
    d = tmp_path / "m"
    _save(d, OLD)
    staging = tmp_path / ".m.new"
    staging.mkdir()
    (staging / WEIGHTS[0]).write_bytes(b"half written")
    with checkpoint._lock(tmp_path):
        assert _load(d) == OLD
        assert staging.is_dir()
    assert _load(d) == OLD
    assert _leftovers(d) == []
