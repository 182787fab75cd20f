"""Printing one streamed answer in a terminal: prefill progress, the text, how it ended."""

from __future__ import annotations

from itertools import chain

from rich.console import Console

from .engine import SamplingParams, Session, TurnResult

__all__ = ["stream_answer"]


def stream_answer(con: Console, session: Session, text: str, params: SamplingParams, prefix: str = "bot> ",
                  keep_on_interrupt: bool = True) -> TurnResult | None:
    """Stream the answer to ``text``: a spinner with the prefill's progress until the first
    token, then the text as it comes; an answer cut off by ``max_new_tokens`` is marked.

    Ctrl-C stops the answer and leaves the session as it was before this turn (the engine
    drops a turn that does not finish). Returns None then, or re-raises KeyboardInterrupt
    when ``keep_on_interrupt`` is False. A ValueError (empty message, too long a prompt)
    is raised before anything is printed or changed.
    """
    status = con.status("prefill...")

    def progress(layers_done: int, num_layers: int, tokens: int) -> None:
        status.update(f"prefill of {tokens:,} new tokens: layer {layers_done}/{num_layers}")

    stream = session.stream(text, params, progress=progress)
    try:
        with status:
            first = next(stream, None)
        con.print(prefix, end="", markup=False, highlight=False)
        for delta in chain([] if first is None else [first], stream):
            con.print(delta, end="", soft_wrap=True, highlight=False, markup=False)
    except KeyboardInterrupt:
        stream.close()  # a generator stopped between tokens restores the session here
        con.print()
        if not keep_on_interrupt:
            raise
        con.print("[yellow]\\[answer stopped; the conversation keeps the turns before it][/]")
        return None
    con.print()
    result = stream.result
    if result.stats.finish_reason == "length":
        limit = "max-new-tokens" if result.stats.new_tokens >= params.max_new_tokens else "context window"
        con.print(f"[dim]\\[answer cut off at {result.stats.new_tokens} tokens: the {limit} limit][/]")
    return result
