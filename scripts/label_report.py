"""How good are the labels? Held-out embedding AUROC and token correlation of each explainer's labels
over a random sample of live features, against two baselines judged on the same windows in the same
run: the feature's single top token, quoted, as its label, and the label of a *different* random
feature (which should sit at chance: 0.5 AUROC, 0 correlation). And whether a person can read them:
the median number of words besides quoted tokens, the share of labels holding a list of 4 or more
unquoted words, and the share of features whose mass lies mostly in one kind of token
(``ingest/labels/kinds/``) whose label names that kind; for the sample, and for every label the
atlas stores.

    .venv/bin/python scripts/label_report.py --atlas atlas --features 500 --out labels.json
    .venv/bin/python scripts/label_report.py --atlas atlas --show 30     # 30 labels beside their top example
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
from featureatlas.ingest.labels.kinds import KINDS
from featureatlas.ingest.labels.label import Labels, label_features
from featureatlas.ingest.labels.llm import make_chat
from featureatlas.ingest.labels.relabel import atlas_config, stored_windows
from featureatlas.ingest.labels.stage import LLM_CACHE
from featureatlas.ingest.labels.wording import listed_words, show_token, words
from featureatlas.store.atlas import Atlas
from featureatlas.store.manifest import CACHE


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
    return "".join(f"[[{t}]]" if i == peak else t for i, t in enumerate(top["tokens"])).strip().replace("\n", "⏎")


def score_table(labels: Labels) -> dict[int, tuple[float | None, float | None]]:
    """(embedding AUROC, token correlation) of each kept label on held-out windows."""
    out = {}
    for f, per in zip(labels.features, labels.scores):
        got = {s["scorer"]: s["score"] for s in per}
        out[f] = (got.get("embedding"), got.get("token"))
    return out


def summarize_scores(scores: dict[int, tuple[float | None, float | None]]) -> dict[str, dict]:
    return {"embedding": describe([a for a, _ in scores.values()]), "token": describe([t for _, t in scores.values()])}


def readability(text: list[str], source: list[str], kind: list[str | None]) -> dict[str, float | int | None]:
    """Words besides quoted tokens (median), the share of labels with a list of 4+ unquoted words, and
    the share of one-kind features named by their kind; over labelled features (``source`` not none)."""
    rows = [(t, k) for t, s, k in zip(text, source, kind) if s != "none"]
    if not rows:
        return {"n": 0}
    of_kind = [(t, k) for t, k in rows if k in KINDS]
    return {"n": len(rows), "median_words": float(np.median([words(t) for t, _ in rows])),
            "word_lists": round(float(np.mean([listed_words(t) >= 4 for t, _ in rows])), 4),
            "n_one_kind": len(of_kind),
            "one_kind_named": round(float(np.mean([KINDS[k].phrase in t for t, k in of_kind])), 4) if of_kind else None}


def stored_readability(con: duckdb.DuckDBPyConnection) -> dict[str, float | int | None]:
    """``readability`` of every label the atlas stores (its kinds too, where it has them)."""
    columns = {c for (c,) in con.execute("select column_name from information_schema.columns "
                                         "where table_name = 'features'").fetchall()}
    kind = "kind" if "kind" in columns else "null"
    rows = con.execute(f"select label, label_source, {kind} from features order by feature_id").fetchall()
    return readability(*(list(c) for c in zip(*rows))) if rows else {"n": 0}


def baselines(labels: Labels, rng: np.random.Generator) -> dict[str, dict[int, tuple[float, float]]]:
    """The top token, quoted, as the label; and another random feature's label."""
    top = labels.judge({f: show_token(t) for f, t in labels.top_token.items()})
    scored = [f for f, s in zip(labels.features, labels.score) if s is not None]
    shift = np.roll(np.arange(len(scored)), 1 + int(rng.integers(len(scored) - 1))) if len(scored) > 1 else []
    text = dict(zip(labels.features, labels.text))
    return {"top_token": top, "random_label": labels.judge({f: text[scored[j]] for f, j in zip(scored, shift)})}


def shown(atlas: Atlas, labels: Labels, n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` random labels with their description, scores and top example, for a person to read."""
    rows = sorted(rng.choice(len(labels.features), min(n, len(labels.features)), replace=False).tolist())
    scores = score_table(labels)
    return [{"feature_id": labels.features[i], "label": labels.text[i], "description": labels.description[i],
             "embedding": scores[labels.features[i]][0], "token": scores[labels.features[i]][1],
             "top_example": top_example(atlas, labels.features[i])} for i in rows]


def run_explainer(atlas: Atlas, con: duckdb.DuckDBPyConnection, sample: list[int], name: str,
                  args: argparse.Namespace) -> tuple[Labels, float]:
    cfg = atlas_config(atlas, {"label_explainer": name, "llm_url": args.llm_url, "llm_model": args.llm_model,
                               "seed": args.seed})
    chat = make_chat(cfg.labels, cfg.run.device, atlas.root / CACHE / LLM_CACHE) if name == "llm" else None
    t0 = time.perf_counter()
    labels = label_features(con, sample, cfg.labels, embed, seed=cfg.run.seed, chat=chat, windows=stored_windows(atlas))
    return labels, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default="atlas")
    p.add_argument("--features", type=int, default=500, help="random live features to label and score")
    p.add_argument("--explainer", nargs="+", default=["contrastive"], choices=("contrastive", "llm"))
    p.add_argument("--show", type=int, default=10, help="random labels printed with their top example")
    p.add_argument("--llm-url")
    p.add_argument("--llm-model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()

    atlas = Atlas(args.atlas)
    con = duckdb.connect(str(atlas.duckdb_path), read_only=True)
    live = [f for (f,) in con.execute("select feature_id from features where n_active > 0 order by feature_id").fetchall()]
    rng = np.random.default_rng(args.seed)
    sample = sorted(rng.choice(live, min(args.features, len(live)), replace=False).tolist())
    report: dict = {"atlas": str(atlas.root), "n_live": len(live), "n_features": len(sample), "scores": {}, "seconds": {}}
    for name in args.explainer:
        labels, seconds = run_explainer(atlas, con, sample, name, args)
        report["seconds"][name] = round(seconds, 1)
        report["scores"][name] = summarize_scores(score_table(labels))
        single = dict(zip(labels.features, labels.single_token))
        report["scores"][f"{name} (not single-token)"] = summarize_scores(
            {f: s for f, s in score_table(labels).items() if not single[f]})
        if name == args.explainer[0]:
            for base, scores in baselines(labels, rng).items():
                report["scores"][base] = summarize_scores(scores)
            report["shown"] = shown(atlas, labels, args.show, rng)
        report.setdefault("readability", {})[name] = readability(labels.text, labels.source, labels.kind)
    report.setdefault("readability", {})["stored (every feature)"] = stored_readability(con)
    con.close()
    print_report(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, default=float)
        print(f"wrote {args.out}")


def print_report(report: dict) -> None:
    print(f"{report['n_features']} random live features of {report['n_live']} ({report['atlas']}), held-out windows")
    print(f"{'labels':<32}{'n':>5}{'AUROC':>8}{'median':>8}{'token r':>9}{'median':>8}")
    for name, d in report["scores"].items():
        e, t = d["embedding"], d["token"]
        if e["n"]:
            print(f"{name:<32}{e['n']:>5}{e['mean']:>8.3f}{e['median']:>8.3f}{t['mean'] or 0:>9.3f}{t.get('median', 0):>8.3f}")
    print(f"\n{'readability':<32}{'n':>6}{'words':>7}{'lists':>8}{'one kind':>10}{'named':>8}")
    for name, r in report.get("readability", {}).items():
        if r["n"]:
            named = "n/a" if r["one_kind_named"] is None else f"{r['one_kind_named']:.1%}"
            print(f"{name:<32}{r['n']:>6}{r['median_words']:>7.1f}{r['word_lists']:>8.1%}{r['n_one_kind']:>10}{named:>8}")
    for e in report.get("shown", []):
        scores = "  ".join(f"{name} {'n/a' if e[key] is None else format(e[key], '.2f')}"
                           for name, key in (("AUROC", "embedding"), ("token r", "token")))
        print(f"\n#{e['feature_id']}  {e['label']}\n    {e['description']}\n    {scores}  top example: {e['top_example'][-160:]}")


if __name__ == "__main__":
    main()
