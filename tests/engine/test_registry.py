import pytest

from loopserve.engine import method_names, resolve_method


def test_registry_rejects_unknown_method_and_lists_known():
    with pytest.raises(ValueError) as info:
        resolve_method("no-such-method")
    msg = str(info.value)
    assert "no-such-method" in msg
    for known in method_names():
        assert known in msg


def test_registry_binds_dense():
    m = resolve_method("dense")
    assert m.prefill.name == "dense" and m.decode.name == "dense"


def test_unknown_knob_is_rejected():
    with pytest.raises(ValueError, match="unknown knob"):
        resolve_method("dense", {"alpha": 0.5})


def test_bad_pairing_is_rejected():
    with pytest.raises(ValueError, match="unknown prefill method"):
        resolve_method("nope+dense")
    with pytest.raises(ValueError, match="unknown decode method"):
        resolve_method("dense+nope")


def test_parse_method_spec_splits_the_method_and_its_knobs():
    from loopserve.engine.registry import parse_method_spec

    assert parse_method_spec("loopserve+dense:alpha=0.95,mode=bounded") == ("loopserve+dense", {"alpha": 0.95, "mode": "bounded"})
    assert parse_method_spec("dense") == ("dense", {})
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_method_spec("loopserve:alpha")
