import json

from loopserve.cli import main


def test_methods_json_lists_every_method(capsys):
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in rows}
    assert {"dense", "loopserve"} <= names
    assert all(r["phase"] in ("prefill", "decode", "prefill+decode") and r["description"] for r in rows)


def test_bench_kv_reuse_json_on_tiny_model(capsys):
    assert main(["bench", "kv-reuse", "--model", "tiny-llama", "--context", "600", "--runs", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("context", "reuse_ttft_s", "reprefill_ttft_s", "speedup"):
        assert key in out
    assert out["new_tokens"] < out["prompt_tokens"]


def test_unknown_method_is_a_clear_cli_error(capsys):
    assert main(["bench", "kv-reuse", "--model", "tiny-llama", "--method", "nope", "--json"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_chat_repl_reset_and_stats(monkeypatch, capsys):
    lines = iter(["hello", "/stats", "/reset", "/stats", "", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", "tiny-llama", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("turn 1:") == 1  # /stats after /reset shows nothing
    assert "conversation cleared" in out
    assert "empty message" in out
