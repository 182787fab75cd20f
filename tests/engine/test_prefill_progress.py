"""The prefill progress callback: once per layer, with the tokens prefilled, never while decoding."""

from loopserve.engine import Engine, SamplingParams


def test_progress_reports_every_layer_of_each_prefill(tiny_models):
    engine = Engine(tiny_models["tiny-llama"], method="loopserve")
    session = engine.new_session()
    calls = []
    report = lambda done, layers, tokens: calls.append((done, layers, tokens))  # noqa: E731

    first = session.stream("Hello there, tell me something.", SamplingParams(max_new_tokens=5), progress=report)
    list(first)
    n = engine.num_layers
    tokens = first.result.stats.prefill_tokens
    assert calls == [(i, n, tokens) for i in range(1, n + 1)]  # decode steps add nothing

    calls.clear()
    second = session.stream("And more?", SamplingParams(max_new_tokens=5), progress=report)
    list(second)
    # The second turn prefills only its new tokens, and says so.
    assert second.result.stats.prefill_tokens < second.result.stats.prompt_tokens
    assert calls == [(i, n, second.result.stats.prefill_tokens) for i in range(1, n + 1)]
