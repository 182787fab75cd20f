"""Plot the decode steps that `batched_step_profile.py` timed: milliseconds per generated
token (a step's time over the conversations it served) against the token's index, one panel
per context length, one line per method and batch size. LoopServe's dense first interval,
its re-selections every 16 tokens and its steps over the views show as three levels.

    python benchmarks/plot_decode_steps.py docs/results/2026-12-03/native-reselection/batched-step-*.json \\
        --out docs/results/2026-12-03/native-reselection/decode-steps.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="JSON files of batched_step_profile.py --json")
    ap.add_argument("--out", required=True, help="PNG file")
    args = ap.parse_args()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [json.loads(Path(f).read_text()) for f in args.results]
    contexts = sorted({r["context_tokens"] for r in runs})
    fig = Figure(figsize=(6 * len(contexts), 4.2))
    axes = fig.subplots(1, len(contexts), squeeze=False)[0]
    for ax, context in zip(axes, contexts):
        for run in sorted((r for r in runs if r["context_tokens"] == context), key=lambda r: r["method"]):
            for mode, style in (("alone", "--"), ("batched", "-")):
                row = run[mode]
                per_token = [t / row["sessions"] for t in row["step_times_ms"]]
                label = f"{run['method']}, {row['sessions']} conversation{'s' if row['sessions'] > 1 else ''}"
                ax.plot(range(2, 2 + len(per_token)), per_token, style, label=label)
        ax.set_title(f"decode at ~{context:,} tokens of context ({runs[0]['threads']} threads)")
        ax.set_xlabel("generated token")
        ax.set_ylabel("ms per generated token")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
