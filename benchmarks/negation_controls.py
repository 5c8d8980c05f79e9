"""Issue 22: a negation sweep's control images (``--n-controls``) broken down by one caption
attribute — how often the gate opened and how many images stayed unchanged (every judge label as
the unsteered twin's and twin similarity >= 0.99), per style (or colour, shape).

Reads the sweep folder's images (``images/linear_l<λ>_s<seed>.safetensors`` and the unsteered
``none_l0_s<seed>``) and gate values (``….gate.json``); the data must match the sweep's
(``negation_data(concept, 64, 64, 0, n_controls=64)``, the CLI defaults with ``--n-controls 64``).

Run: ``cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python benchmarks/negation_controls.py runs/gate-t2i-striped-x-probe
--concept striped --by style --strengths 0.75,1 [--seeds 0,1,2]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", help="a negation sweep folder with its images")
    p.add_argument("--concept", default="striped")
    p.add_argument("--by", default="style", choices=("style", "colour", "shape"))
    p.add_argument("--strengths", default="0.75")
    p.add_argument("--seeds", default="0,1,2")
    a = p.parse_args(argv)
    from acttransport.evaluate.tasks.images import load_images, twin_similarity
    from acttransport.evaluate.tasks.t2i import negation_data
    from acttransport.toy import load_toy_judge

    d, judge, out = negation_data(a.concept, 64, 64, 0, n_controls=64), load_toy_judge(), Path(a.dir) / "images"
    n = len(d.prompts)
    for lam in a.strengths.split(","):
        stats: dict[str, dict[str, float]] = {}
        for seed in a.seeds.split(","):
            imgs = load_images(out / f"linear_l{lam}_s{seed}.safetensors")[n:]
            twins = load_images(out / f"none_l0_s{seed}.safetensors")[n:]
            gate_file = out / f"linear_l{lam}_s{seed}.gate.json"
            opened = json.loads(gate_file.read_text())[n:] if gate_file.is_file() else [0.0] * len(imgs)
            pa, pb, sim = judge.predict(imgs), judge.predict(twins), twin_similarity(judge, imgs, twins)
            for i, keep in enumerate(d.controls_keep):
                same = all(pa[h]["label"][i] == pb[h]["label"][i] for h in pa)
                s = stats.setdefault(keep[a.by], {"images": 0, "open": 0.0, "unchanged": 0})
                s["images"] += 1
                s["open"] += opened[i]
                s["unchanged"] += int(same and float(sim[i]) >= 0.99)
        print(json.dumps({"dir": a.dir, "strength": float(lam), a.by: {k: {"images": v["images"], "gate_open_%": round(100 * v["open"] / v["images"], 1),
                                                                             "unchanged_%": round(100 * v["unchanged"] / v["images"], 1)}
                                                                         for k, v in sorted(stats.items())}}))


if __name__ == "__main__":
    main()
