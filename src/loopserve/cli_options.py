"""Options every command shares (``loopserve ...``, ``python -m loopserve.server``).

Each command's parser gets them from :func:`add_common_options`; its ``main`` applies
them with :func:`apply_common_options` right after parsing, before any model loads.
Bad values are argparse errors (exit status 2), raised while parsing.
"""

from __future__ import annotations

import argparse

__all__ = ["DEVICE_CHOICES", "DTYPE_CHOICES", "add_common_options", "add_numerics_options", "apply_common_options", "thread_count"]


def thread_count(text: str) -> int:
    """argparse type of ``--threads``: a positive integer."""
    from .threads import check_threads  # torch is imported only when the option is used

    try:
        return check_threads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_common_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the shared options to one command's parser; returns the parser."""
    parser.add_argument(
        "--threads", type=thread_count, default=None, metavar="N",
        help="threads for torch, the native kernels and the tokenizers together (default: the physical cores)",
    )
    return parser


#: Kept in step with ``loopserve.models.loader`` (a test checks it); listed here so that
#: parsing does not import torch.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "bf16-prefill")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
_DTYPE_HELP = ("numerics: auto (bfloat16 on CUDA, float32 on a CPU), float32, bfloat16, or bf16-prefill (bfloat16 "
               "weights for prefill, float32 for decode and the KV cache: faster prefill on a CPU with BF16 "
               "instructions, answers further from float32's)")


def add_numerics_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--dtype`` and ``--device`` of the commands that load a model."""
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=_DTYPE_HELP)
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="where the model runs: auto (CUDA when PyTorch sees a GPU, else the CPU), cpu or cuda")
    return parser


def apply_common_options(args: argparse.Namespace) -> None:
    """Apply the shared options of parsed ``args`` to the process (the thread budget)."""
    from .threads import configure

    configure(getattr(args, "threads", None))
