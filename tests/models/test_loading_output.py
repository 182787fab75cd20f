"""A first load of the default model (GGUF conversion, then the cached copy) shows one weights bar."""

import re

import pytest


@pytest.mark.slow
def test_first_load_prints_loading_weights_once(monkeypatch, tmp_path, capfd):
    from loopserve.models import load_model

    monkeypatch.setenv("LOOPSERVE_CACHE", str(tmp_path))  # a fresh cache: the GGUF is converted
    load_model("smollm2")
    err = capfd.readouterr().err
    assert "converting the default model's GGUF once" in err
    # tqdm redraws a bar in place ("\r"): count the bars that start, not their redraws.
    assert len(re.findall(r"Loading weights:\s+0%", err)) == 1, err
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()
