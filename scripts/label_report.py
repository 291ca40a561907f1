"""How good are the labels? Held-out embedding AUROC of each explainer's labels over a random sample of
live features, against two baselines judged on the same windows in the same run: the feature's single
top token as its label, and the label of a *different* random feature (which should sit near 0.5).

    .venv/bin/python scripts/label_report.py --atlas atlas --features 500 --out labels.json
    .venv/bin/python scripts/label_report.py --atlas atlas --explainer contrastive llm --llm-url http://127.0.0.1:8080/v1

Nothing is written to the atlas (use `featureatlas label` for that).
"""

from __future__ import annotations

import argparse
import json
import time

import duckdb
import numpy as np
from featureatlas.ingest.embed import embed
from featureatlas.ingest.labels.label import label_features
from featureatlas.ingest.labels.llm import make_chat
from featureatlas.ingest.labels.relabel import atlas_config
from featureatlas.ingest.labels.stage import LLM_CACHE
from featureatlas.store.atlas import Atlas
from featureatlas.store.manifest import CACHE, duckdb_file


def describe(scores: list[float]) -> dict[str, float | int | None]:
    a = np.array([s for s in scores if s is not None and not np.isnan(s)])
    if not len(a):
        return {"n": 0, "mean": None}
    q = np.percentile(a, [10, 25, 50, 75, 90])
    return {"n": int(len(a)), "mean": float(a.mean()), "p10": q[0], "p25": q[1], "median": q[2], "p75": q[3], "p90": q[4]}


def top_example(atlas: Atlas, feature_id: int) -> str:
    """The feature's strongest stored example, its strongest token in [[brackets]]."""
    top = next((e for e in atlas.feature_examples(feature_id) if e["kind"] == "top"), None)
    if top is None:
        return ""
    peak = int(np.argmax(top["activations"]))
    return "".join(f"[[{t}]]" if i == peak else t for i, t in enumerate(top["tokens"])).strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default="atlas")
    p.add_argument("--features", type=int, default=500, help="random live features to label and score")
    p.add_argument("--explainer", nargs="+", default=["contrastive"], choices=("contrastive", "llm"))
    p.add_argument("--llm-url")
    p.add_argument("--llm-model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()

    atlas = Atlas(args.atlas)
    con = duckdb.connect(str(atlas.root / duckdb_file(atlas.manifest)), read_only=True)
    live = [f for (f,) in con.execute("select feature_id from features where n_active > 0 order by feature_id").fetchall()]
    rng = np.random.default_rng(args.seed)
    sample = sorted(rng.choice(live, min(args.features, len(live)), replace=False).tolist())
    report: dict = {"atlas": str(atlas.root), "n_live": len(live), "n_features": len(sample), "auroc_mean": {},
                    "distribution": {}, "single_token": {}, "simulation_mean": {}, "seconds": {}}
    baselines_done = False
    for name in args.explainer:
        t0 = time.perf_counter()
        cfg = atlas_config(atlas, {"label_explainer": name, "label_scorers": ["embedding", "simulation"],
                                   "llm_url": args.llm_url, "llm_model": args.llm_model, "seed": args.seed})
        chat = make_chat(cfg.labels, cfg.run.device, atlas.root / CACHE / LLM_CACHE) if name == "llm" else None
        labels = label_features(con, sample, cfg.labels, embed, seed=cfg.run.seed, chat=chat)
        report["seconds"][name] = round(time.perf_counter() - t0, 1)
        report["auroc_mean"][name] = describe(labels.score)["mean"]
        report["distribution"][name] = describe(labels.score)
        sims = [next((s["score"] for s in per if s["scorer"] == "simulation"), None) for per in labels.scores]
        report["simulation_mean"][name] = describe(sims)["mean"]
        single = np.array(labels.single_token)
        report["single_token"][name] = {
            "n": int(single.sum()),
            "auroc_mean_single": describe([s for s, k in zip(labels.score, single) if k])["mean"],
            "auroc_mean_others": describe([s for s, k in zip(labels.score, single) if not k])["mean"],
        }
        if not baselines_done:
            top = labels.judge({f: t.strip() or t for f, t in labels.top_token.items()})
            scored = [f for f, s in zip(labels.features, labels.score) if s is not None]
            shift = np.roll(np.arange(len(scored)), 1 + int(rng.integers(len(scored) - 1))) if len(scored) > 1 else []
            text = dict(zip(labels.features, labels.text))
            other = labels.judge({f: text[scored[j]] for f, j in zip(scored, shift)})
            for base, scores in (("top_token", top), ("random_label", other)):
                report["auroc_mean"][base] = describe(list(scores.values()))["mean"]
                report["distribution"][base] = describe(list(scores.values()))
            report["examples"] = [
                {"feature_id": f, "label": t, "score": s, "top_example": top_example(atlas, f)}
                for f, t, s in list(zip(labels.features, labels.text, labels.score))[:: max(1, len(sample) // 10)][:10]
            ]
            baselines_done = True
    con.close()

    print(f"{report['n_features']} random live features of {report['n_live']} ({atlas.root})")
    print(f"{'labels':<14}{'n':>5}{'mean':>8}{'p10':>7}{'median':>8}{'p90':>7}")
    for name, d in report["distribution"].items():
        if d["n"]:
            print(f"{name:<14}{d['n']:>5}{d['mean']:>8.3f}{d['p10']:>7.3f}{d['median']:>8.3f}{d['p90']:>7.3f}")
    for name, d in report["single_token"].items():
        print(f"{name}: {d['n']} single-token features (mean AUROC {d['auroc_mean_single']}), others {d['auroc_mean_others']}")
    for e in report.get("examples", []):
        print(f"#{e['feature_id']} {e['score'] or float('nan'):.2f} {e['label']!r}\n    {e['top_example']!r}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, default=float)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
