"""The `loopserve` command's argument parser class: every option's help shows its default."""

from __future__ import annotations

import argparse
import copy

__all__ = ["DefaultsHelpFormatter", "HelpParser"]


def _default_text(action: argparse.Action) -> str:
    if action.nargs == 0:  # a flag: on when given
        return "(default: on)" if action.default else "(default: off)"
    return "(default: %(default)s)"


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to every option, flags and options without help text included,
    unless the help already states its default in words."""

    def _format_action(self, action: argparse.Action) -> str:
        shows = action.option_strings and action.default is not argparse.SUPPRESS
        if shows and "default" not in (action.help or "").lower():
            action = copy.copy(action)
            action.help = f"{(action.help or '').strip()} {_default_text(action)}".strip()
        return super()._format_action(action)


class HelpParser(argparse.ArgumentParser):
    """ArgumentParser whose help lists defaults; its sub-commands' parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
