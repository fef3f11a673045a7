"""Fixtures for the pipeline tests."""
import pytest


@pytest.fixture
def valid_mixer(monkeypatch):
    """A registered mixer name: a real one when the registry is filled, else a stub that accepts any config
    (the launcher's own checks are under test, not the mixers)."""
    from linear_moe.model.mixers import MIXERS

    if MIXERS:
        return "gla" if "gla" in MIXERS else sorted(MIXERS)[0]

    class StubMixer:
        @classmethod
        def validate_config(cls, config):
            return None

    monkeypatch.setitem(MIXERS, "stub", StubMixer)
    return "stub"
