import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loopserve
from loopserve.cli import CHAT_COMMANDS, build_parser, main
from loopserve.engine import Engine
from loopserve.models import resolve_dtype

REPO = Path(__file__).resolve().parents[1]
from loopserve import threads
from loopserve.server.cli import main as serve_main


def _chat(monkeypatch, capsys, lines, *extra):
    feed = iter(lines)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(feed))
    assert main(["chat", "--model", "tiny-llama", "--max-new-tokens", "4", *extra]) == 0
    return capsys.readouterr().out


def test_methods_json_lists_every_method_with_its_knobs(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"dense", "loopserve", "snapkv", "minference"} <= set(rows)
    assert all(r["phase"] in ("prefill", "decode", "prefill+decode") and r["description"] for r in rows.values())
    from loopserve.cache.snapkv import SnapKV

    assert rows["snapkv"]["knobs"] == {"budget": SnapKV().budget, "window": SnapKV().window, "pool": SnapKV().pool}
    assert rows["dense"]["knobs"] == {}
    assert {"alpha", "budget", "n_d", "first"} <= set(rows["loopserve"]["knobs"])  # both phases' knobs


def test_methods_table_shows_knobs_and_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "knobs (defaults)" in out and "budget=1024" in out


def test_methods_json_into_a_closed_pipe_exits_quietly():
    # `loopserve methods --json | head`: the reader is gone before anything is written.
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    try:
        done = subprocess.run([sys.executable, "-m", "loopserve.cli", "methods", "--json"], stdout=write_end,
                              stderr=subprocess.PIPE, env=env, text=True)
    finally:
        os.close(write_end)
    assert done.returncode == 0
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"loopserve {loopserve.__version__}"


def _commands(parser_help: str) -> list[str]:
    return re.search(r"\{([a-z,-]+)\}", parser_help).group(1).split(",")


def _options(help_text: str) -> dict[str, str]:
    """Option entries of a --help text: first option string -> its whole help."""
    entries, current = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (-{1,2}[a-z][\w-]*)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("      "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_every_help_option_shows_its_default(monkeypatch):
    import argparse

    shown = {}
    monkeypatch.setattr(argparse.ArgumentParser, "print_help", lambda self, file=None: shown.update(text=self.format_help()))

    def help_of(cmd: list[str]) -> str:
        with pytest.raises(SystemExit):
            build_parser().parse_args([*cmd, "--help"])
        return shown["text"]

    commands = [[c] for c in _commands(help_of([])) if c != "bench"]
    commands += [["bench", c] for c in _commands(help_of(["bench"]))]
    assert ["chat"] in commands and ["serve"] in commands and ["bench", "report"] in commands
    for cmd in commands:
        options = _options(help_of(cmd))
        assert len(options) > 1, cmd
        for option, text in options.items():
            if option not in ("-h", "--help"):
                assert "default" in text, f"loopserve {' '.join(cmd)} {option}: {text}"


def test_bench_kv_reuse_json_on_tiny_model(capsys):
    args = ["bench", "kv-reuse", "--model", "tiny-llama", "--context", "600", "--runs", "1", "--json", "--threads", "1"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("context", "reuse_ttft_s", "reprefill_ttft_s", "speedup"):
        assert key in out
    assert out["new_tokens"] < out["prompt_tokens"]
    assert out["threads"] == 1 and out["dtype"] == resolve_dtype("auto")  # the settings the timings depend on


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


def test_chat_and_demo_default_to_the_loopserve_method():
    parser = build_parser()
    assert parser.parse_args(["chat"]).method == "loopserve"
    assert parser.parse_args(["demo"]).method == "loopserve"
    chat = parser.parse_args(["chat"])
    assert 0 < chat.temperature <= 1 and chat.top_p < 1 and chat.repetition_penalty > 1


@pytest.fixture
def no_weights(monkeypatch):
    """Fails a test that loads weights: bad input must be rejected before."""
    import loopserve.models

    def load_model(*args, **kwargs):
        raise AssertionError("weights loaded before the input was checked")

    monkeypatch.setattr(loopserve.models, "load_model", load_model)


@pytest.mark.parametrize("argv, message", [
    (["chat", "--method", "nope"], "unknown method 'nope'"),
    (["demo", "--method", "dense+nope"], "unknown decode method 'nope'"),
    (["chat", "--knob", "nope=1"], "unknown knob(s) ['nope']"),
    (["chat", "--knob", "alpha"], "--knob expects NAME=VALUE"),
    (["chat", "--temperature", "-1"], "temperature"),
    (["chat", "--top-p", "0"], "top_p"),
    (["chat", "--top-k", "-2"], "top_k"),
    (["chat", "--repetition-penalty", "0.5"], "repetition_penalty"),
    (["chat", "--max-new-tokens", "0"], "max_new_tokens"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["bench", "kv-reuse", "--method", "nope"], "unknown method 'nope'"),
    (["serve", "--port", "99999"], "--port must be in 1..65535, got 99999"),
    (["serve", "--port", "0"], "--port must be in 1..65535, got 0"),
    (["serve", "--method", "nope"], "unknown method 'nope'"),
    (["serve", "--knob", "nope=1"], "unknown knob(s) ['nope']"),
    (["serve", "--default-temperature", "-1"], "temperature"),
    (["serve", "--default-max-tokens", "0"], "max_new_tokens"),
])
def test_bad_input_is_rejected_before_the_weights_load(no_weights, capsys, argv, message):
    assert main([*argv, "--model", "tiny-llama"]) == 2
    assert message in capsys.readouterr().err


def test_context_larger_than_the_model_window_says_so(capsys):
    assert main(["demo", "--model", "tiny-llama", "--context", "5000"]) == 2
    err = capsys.readouterr().err
    assert "--context 5000 is larger than the model's context window of 4096 tokens" in err


def test_chat_repl_reset_and_stats(monkeypatch, capsys):
    out = _chat(monkeypatch, capsys, ["hello", "/stats", "/reset", "/stats", "", "   ", "/quit"])
    assert out.count("turn 1:") == 1  # /stats after /reset shows nothing
    assert "conversation cleared" in out and "no turns yet" in out
    # /stats names the method and the tokens generated
    assert re.search(r"turn 1: method loopserve, prefill \d+ \(cached 0\), generated [1-4] \(", out)
    assert "empty message" not in out  # empty lines are ignored, not sent


def test_chat_help_lists_the_commands_and_is_not_sent_to_the_model(monkeypatch, capsys):
    out = _chat(monkeypatch, capsys, ["/help", "/nope", "/[bold]x", "/stats", "/quit"])
    for command, what in CHAT_COMMANDS.items():
        assert command in out and what.split(":")[0] in out
    assert "unknown command /nope" in out and "unknown command /[bold]x" in out  # shown as typed
    assert "no turns yet" in out  # neither /help nor /nope became a turn


def test_chat_marks_a_cut_off_answer(monkeypatch, capsys):
    out = _chat(monkeypatch, capsys, ["hello", "/stats", "/quit"], "--temperature", "0", "--repetition-penalty", "1")
    assert "generated 4 (length)" in out  # the tiny model's greedy answer runs into the limit
    assert "[answer cut off at 4 tokens: the max-new-tokens limit]" in out


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(monkeypatch, capsys):
    forward = Engine.forward
    armed = {"on": False}

    def forward_with_ctrl_c(self, ids, cache, ctx, all_logits=False):
        if armed["on"] and len(ids) == 1:  # a decode step of the armed turn: Ctrl-C mid-answer
            armed["on"] = False
            raise KeyboardInterrupt
        return forward(self, ids, cache, ctx, all_logits)

    monkeypatch.setattr(Engine, "forward", forward_with_ctrl_c)
    lines = iter(["hello", "tell me more", "/stats", "and now?", "/stats", "/quit"])

    def read(prompt=""):
        line = next(lines)
        armed["on"] = line == "tell me more"
        return line

    monkeypatch.setattr("builtins.input", read)
    assert main(["chat", "--model", "tiny-llama", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "[answer stopped; the conversation keeps the turns before it]" in out
    stats = re.findall(r"^turn (\d+): (.*)$", out, flags=re.M)
    # /stats after the stop: turn 1 only; after the next message: turns 1 and 2
    assert [n for n, _ in stats] == ["1", "1", "2"]
    assert "cached 0)" not in stats[2][1]  # turn 2 reused turn 1's cache


def test_bench_report_writes_under_runs_unless_out_is_given(monkeypatch, tmp_path):
    import loopserve.bench.report as report

    calls = []
    monkeypatch.setattr(report, "write_report", lambda results, out, reference, methods=None, datasets=None: calls.append(Path(out)) or {})
    assert main(["bench", "report", "--results", str(tmp_path / "r.jsonl")]) == 0
    assert main(["bench", "report", "--results", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "x")]) == 0
    assert calls == [Path("runs/bench/report"), tmp_path / "x"]


def test_demo_output_is_honest(tiny_models, capsys):
    from rich.console import Console

    from loopserve.demo import run_demo, speed_phrase

    assert speed_phrase(1.0, 2.0) == "2.00x faster"
    assert speed_phrase(2.0, 0.4) == "5.00x slower"  # never "0.20x faster"
    console = Console(width=200, force_terminal=False)
    with console.capture() as captured:
        result = run_demo(Engine(tiny_models["tiny-llama"], method="loopserve"), context=600, max_new_tokens=3,
                          console=console)
    out = captured.get()
    threads = torch.get_num_threads()
    assert result["method"] == "loopserve" and result["threads"] == threads
    assert f"method loopserve, {threads} thread" in out
    assert not re.search(r"\b0\.\d+x faster", out)
    for row in result["turns"][1:]:
        verdict = "faster" if row["ttft_ratio"] >= 1 else "slower"
        assert f"turn {row['turn']}: with KV reuse the time to first token is" in out and verdict in row["verdict"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_device_cuda_without_a_gpu_says_so(capsys):
    assert main(["demo", "--model", "tiny-llama", "--device", "cuda"]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err
