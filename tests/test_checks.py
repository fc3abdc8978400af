"""fineviti._checks' reading of the environment: one spelling of on and off for every variable of ours, and
TRITON_INTERPRET as Triton itself reads it."""

import pytest

from fineviti import _checks


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("YES", True), ("on", True), (" y ", True),
                                             ("0", False), ("false", False), ("No", False), ("off", False),
                                             ("", False)])
def test_env_flag_spellings(monkeypatch, value, expected):
    monkeypatch.setenv("FINEVITI_CHECKS", value)
    assert _checks.env_flag("FINEVITI_CHECKS") is expected


def test_env_flag_refuses_what_it_cannot_read(monkeypatch):
    """FINEVITI_CHECKS=off turned the checks on, FINEVITI_SKIP_CUDA_BUILD=false skipped the CUDA build: anything
    not 0 or empty counted as on."""
    monkeypatch.delenv("FINEVITI_CHECKS", raising=False)
    assert _checks.env_flag("FINEVITI_CHECKS") is False and _checks.env_flag("FINEVITI_CHECKS", True) is True
    monkeypatch.setenv("FINEVITI_CHECKS", "sometimes")
    with pytest.raises(ValueError, match=r"FINEVITI_CHECKS='sometimes' is not an on/off value"):
        _checks.env_flag("FINEVITI_CHECKS")


def test_value_checks_follow_the_flag(monkeypatch):
    import torch

    meta = torch.empty(2, device="meta")  # neither a CPU tensor nor a host read: only the flag turns checks on
    monkeypatch.setenv("FINEVITI_CHECKS", "off")
    assert not _checks.value_checks_enabled(meta)
    monkeypatch.setenv("FINEVITI_CHECKS", "on")
    assert _checks.value_checks_enabled(meta)


def test_triton_interpreting_reads_as_triton_does(monkeypatch):
    """TRITON_INTERPRET=true makes Triton interpret (its own getenv_bool), but the ops compared the value with "1"
    and refused CPU tensors."""
    from triton._C.libtriton import getenv_bool

    for value in ("1", "true", "ON", "y", "0", "false", "", "2", "maybe", " 1", "true "):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert _checks.triton_interpreting() is getenv_bool("TRITON_INTERPRET", False), value
