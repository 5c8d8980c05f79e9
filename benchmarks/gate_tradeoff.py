"""Issue 22: mean p(toxic) against the PPL-Wiki rise of gated and always-on toxicity sweeps, one
point per steered (sweep, λ), labelled by the sweep folder; the unsteered cell of the first folder
that has one is the reference. Writes a PNG.

Run: ``cd /work/main && .venv/bin/python benchmarks/gate_tradeoff.py docs/results/sweeps/gate-gemma-* -o docs/results/gate-gemma-tradeoff.png``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from acttransport.evaluate.results import load_results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+")
    p.add_argument("-o", "--out", required=True)
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {d: load_results(d) for d in a.dirs}  # read once per folder
    aggs = {d: r["aggregates"] for d, r in results.items()}
    gated = {d: bool(r.get("config", {}).get("gate")) for d, r in results.items()}
    base = next(x for rows in aggs.values() for x in rows if x["method"] == "none")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([0.0], [100 * base["toxic_score_mean"]], color="black", marker="s")
    ax.annotate("unsteered", (0.0, 100 * base["toxic_score_mean"]), textcoords="offset points", xytext=(-8, 8), fontsize=8)
    crowded = []  # points near no PPL rise (the gated ones): labelled in a column to their right, joined by a line
    for i, (d, rows) in enumerate(aggs.items()):
        for x in rows:
            if x["method"] == "none":
                continue
            rise = 100 * (x["wiki_ppl_mean"] / base["wiki_ppl_mean"] - 1)
            y = 100 * x["toxic_score_mean"]
            dot = ax.scatter([rise], [y], marker="o" if gated[d] else "^")
            label, colour = f"{Path(d).name.removeprefix('gate-gemma-')} λ={x['strength']:g}", dot.get_facecolor()[0]
            if abs(rise) < 1.0:
                crowded.append((y, rise, label, colour))
            else:
                ax.annotate(label, (rise, y), textcoords="offset points", xytext=(6, -10 if i % 2 else 3), fontsize=8,
                            color=colour)  # the label in its point's colour: close points stay readable
    top = max(100 * base["toxic_score_mean"], max((c[0] for c in crowded), default=0.0))
    for k, (y, rise, label, colour) in enumerate(sorted(crowded, key=lambda c: -c[0])):
        ax.annotate(label, (rise, y), xytext=(1.5, top - 0.22 * k), textcoords="data", fontsize=8, color=colour, va="center",
                    arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6, "alpha": 0.7})
    ax.set_xlabel("PPL-Wiki rise over unsteered (%)")
    ax.set_ylabel("mean p(toxic) of the continuations (%)")
    ax.set_title("Gemma-3-270M, Linear-AcT: gated (circles) vs always-on (triangles)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = Path(a.out).with_name(f".{Path(a.out).name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(a.out)
    print(a.out)


if __name__ == "__main__":
    main()
