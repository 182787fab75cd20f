import argparse
import json

import pytest
import torch

from loopserve import threads
from loopserve.cli import build_parser, main
from loopserve.server.cli import main as serve_main


def test_methods_json_lists_every_method(capsys):
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in rows}
    assert {"dense", "loopserve"} <= names
    assert all(r["phase"] in ("prefill", "decode", "prefill+decode") and r["description"] for r in rows)


def test_bench_kv_reuse_json_on_tiny_model(capsys):
    args = ["bench", "kv-reuse", "--model", "tiny-llama", "--context", "600", "--runs", "1", "--json", "--threads", "1"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("context", "reuse_ttft_s", "reprefill_ttft_s", "speedup"):
        assert key in out
    assert out["new_tokens"] < out["prompt_tokens"]
    assert out["threads"] == 1 and out["dtype"] == "float32"  # the settings the timings depend on


def leaf_commands(parser: argparse.ArgumentParser, path=()):
    """(command path, parser) of every runnable command under ``parser``."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaf_commands(sub, (*path, name))


def test_every_command_takes_threads():
    commands = dict(leaf_commands(build_parser()))
    assert {("chat",), ("serve",), ("methods",), ("bench", "run"), ("bench", "kv-reuse"), ("bench", "report")} <= set(commands)
    for path, parser in commands.items():
        assert "--threads" in parser._option_string_actions, path


def test_threads_option_is_applied_before_the_command(capsys):
    assert main(["methods", "--json", "--threads", "3"]) == 0
    assert torch.get_num_threads() == 3 and threads.budget() == 3


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_bad_threads_are_rejected_before_any_model_loads(monkeypatch, capsys, bad):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded despite a bad --threads")

    monkeypatch.setattr("loopserve.models.load_model", no_loading)
    for run, argv in ((main, ["bench", "kv-reuse", "--model", "tiny-llama"]), (serve_main, ["--model", "tiny-llama"])):
        with pytest.raises(SystemExit) as exc:
            run([*argv, f"--threads={bad}"])
        assert exc.value.code == 2
        assert "argument --threads: threads must be" in capsys.readouterr().err


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
