"""A markdown table from one or more ``scripts/run_ablation.py`` result files (one per seed): per variant,
the held-out figures of each seed and their mean, on the generator's captions and on the paraphrases.

    python scripts/ablation_table.py docs/results/vd_ablation_s0.json docs/results/vd_ablation_s1.json

A variant missing from a file is left out of that seed's cell (the table says how many seeds it has).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLUMNS = (("itm_acc", 1, "ITM"), ("t2i_r1", 0, "t2i R@1"), ("i2t_r1", 0, "i2t R@1"),
           ("para_itm_acc", 1, "para ITM"), ("para_t2i_r1", 0, "para t2i R@1"),
           ("para_i2t_r1", 0, "para i2t R@1"))


def cell(values: list[float], digits: int) -> str:
    """'mean (a / b)' with the per-seed values, or the one value."""
    fmt = (lambda v: f"{v:.3f}") if digits else (lambda v: f"{v:.0f}")
    if len(values) == 1:
        return fmt(values[0])
    return f"**{fmt(sum(values) / len(values))}** ({' / '.join(fmt(v) for v in values)})"


def table(results: list[dict[str, Any]]) -> str:
    names: list[str] = []
    for r in results:
        names += [n for n in r["variants"] if n not in names]
    seeds = [r["seed"] for r in results]
    head = ["variant", "seeds", *(label for _, _, label in COLUMNS), "perplexity / k"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        runs = [(s, r["variants"][name]["heldout"]) for s, r in zip(seeds, results, strict=True)
                if name in r["variants"]]
        row = [name, ", ".join(str(s) for s, _ in runs)]
        for key, digits, _ in COLUMNS:
            vals = [h[key] for _, h in runs if key in h]
            row.append(cell(vals, digits) if len(vals) == len(runs) else "—")
        if all(h.get("vd_enabled") for _, h in runs):
            row.append(cell([h["vd_perplexity"] / h["vd_num_codes"] for _, h in runs], 2))
        else:
            row.append("—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="run_ablation.py --out files, one per seed")
    a = p.parse_args(argv)
    out = table([json.loads(path.read_text()) for path in a.results])
    print(out)
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
