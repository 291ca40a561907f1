"""``featureatlas``: one command line for building, inspecting and serving atlases."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from featureatlas.ingest.config import (
    EXPLAINERS,
    GROUPS,
    PROFILES,
    SCORERS,
    SETTINGS,
    AtlasConfig,
    RunConfig,
    base_type,
    config_of,
    default_of,
    flag,
    load_config,
)
from featureatlas.ingest.runtime import configure
from featureatlas.ingest.steer import MODES, Edit
from featureatlas.store.atlas import SORTABLE, QueryInterrupted
from featureatlas.store.errors import BadParameter, UserError
from featureatlas.store.export import FORMATS
from featureatlas.store.location import FOLLOW_EVERY_S, is_remote, local_path, readable
from featureatlas.store.search import FUSED, SEARCH_MODES

if TYPE_CHECKING:  # the service imports torch: only the commands that query load it
    from featureatlas.api.service import AtlasService

EXIT_BAD_INPUT = 2
ATLAS_DEFAULT = RunConfig.atlas

def _add_ingest(sub: argparse._SubParsersAction) -> None:
    """Every setting of ``AtlasConfig`` is a flag of the same name, with its declared type and help,
    one argument group per config group."""
    p = sub.add_parser("ingest", help="build an atlas: harvest, train, encode, label, publish")
    p.add_argument("--profile", default="quick", choices=sorted(PROFILES), help="named defaults (quick: the demo)")
    p.add_argument("--config", help="TOML file of settings (flat keys or [group] tables)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    for group, cls in GROUPS.items():
        options = p.add_argument_group(f"{group} settings")
        for f in dataclasses.fields(cls):
            kind = base_type(SETTINGS[f.name][1])
            item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
            bare = f.metadata["bare"]
            options.add_argument(flag(f.name), dest=f.name, type=item or kind,
                                 nargs="+" if item else "?" if bare is not None else None, const=bare,
                                 help=f"{f.metadata['help']} (default: {default_of(f)})")


def _config_from(args: argparse.Namespace) -> AtlasConfig:
    overrides: dict[str, Any] = {name: getattr(args, name) for name in SETTINGS}
    return load_config(args.profile, args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featureatlas", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_ingest(sub)
    p = sub.add_parser("label", help="re-label an existing atlas in place (new LanceDB version)")
    p.add_argument("--atlas", default=ATLAS_DEFAULT)
    # the same names as the ingest's settings work too (errors name those)
    p.add_argument("--explainer", "--label-explainer", dest="explainer", choices=EXPLAINERS,
                   help="who writes labels (default: the atlas's)")
    p.add_argument("--scorer", "--label-scorers", dest="scorer", nargs="+", choices=SCORERS,
                   help="label scorers (intervention steers the model); the first gives label_score")
    p.add_argument("--features", help="ids and ranges, e.g. 3,7,100-120 (default: all)")
    p.add_argument("--llm-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--llm-model", help="model name at the endpoint, or a local instruct model folder")
    p.add_argument("--llm-api-key-env", help="environment variable holding the endpoint's API key")
    p.add_argument("--llm-max-calls", type=int, help="budget of LLM calls for this run")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("sweep", help="scaling laws: a grid of dictionaries on an atlas's cached activations")
    p.add_argument("--atlas", default=ATLAS_DEFAULT)
    p.add_argument("--features", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    p.add_argument("--tokens", nargs="+", type=int, default=[250_000, 500_000, 1_000_000])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--target-compute", type=float, help="FLOPs to plan for (default: 100x the largest run)")
    p.add_argument("--out", help="folder for sweep.json and the plots (default: ATLAS/sweep)")
    p = sub.add_parser("info", help="print an atlas's manifest summary")
    p.add_argument("--atlas", default=ATLAS_DEFAULT)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("serve", help="serve an atlas over HTTP (Litestar; OpenAPI at /schema)")
    p.add_argument("--atlas", default=ATLAS_DEFAULT)
    p.add_argument("--host", default="127.0.0.1", help="beyond loopback (e.g. 0.0.0.0), a token is required")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", help="device for search by inference (default: the one the atlas was built on)")
    p.add_argument("--token", help="required by /api and /schema (default: $FEATUREATLAS_TOKEN, which keeps it out "
                                   "of process lists)")
    p.add_argument("--follow-every", type=float, metavar="SECONDS",
                   help=f"for an s3:// atlas, how often to look for a new publish there (default {FOLLOW_EVERY_S:g}; a "
                        "local atlas is followed at every request)")
    _add_queries(sub)
    p = sub.add_parser("export", help="write the atlas in a format other tools read")
    p.add_argument("--atlas", default=ATLAS_DEFAULT)
    p.add_argument("--format", choices=FORMATS, required=True,
                   help="neuronpedia: feature and explanation JSON; parquet: every table; saelens: the dictionary")
    p.add_argument("--out", help="folder to write to (saelens without it: print where the dictionary is)")
    return parser


def _add_queries(sub: argparse._SubParsersAction) -> None:
    """The HTTP API's queries on the command line, and export."""
    p = sub.add_parser("search", help="natural-language search over features")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--mode", choices=(*SEARCH_MODES, FUSED), help="restrict to one signal (default: all, fused)")
    p.add_argument("--dictionary", help="only this dictionary's features (an id of `featureatlas dictionaries`)")
    p = sub.add_parser("neighbors", help="nearest features to a feature")
    p.add_argument("feature_id", type=int)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--by", choices=("decoder", "coactivation"), default="decoder")
    p.add_argument("--dictionary", help="only this dictionary's features (an id of `featureatlas dictionaries`)")
    p = sub.add_parser("feature", help="one feature: label, statistics and examples")
    p.add_argument("feature_id", type=int)
    p = sub.add_parser("features", help="a page of the feature list")
    p.add_argument("--sort", choices=SORTABLE, default="density")
    p.add_argument("--order", choices=("asc", "desc"), default="desc")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p = sub.add_parser("contrast", help="features on every positive prompt and on no negative one")
    p.add_argument("--positive", nargs="+", required=True, metavar="PROMPT")
    p.add_argument("--negative", nargs="+", metavar="PROMPT")
    p.add_argument("-k", type=int, default=10)
    sub.add_parser("dictionaries", help="the atlas's dictionaries: id, hook point, architecture, width, held-out metrics")
    p = sub.add_parser("sql", help="read-only SQL over the analytics database")
    p.add_argument("sql")
    p = sub.add_parser("probe", help="top features of each token of a text")
    p.add_argument("text")
    p.add_argument("-k", type=int, default=5)
    p = sub.add_parser("steer", help="continue a prompt twice: untouched, and with features clamped or pushed")
    p.add_argument("prompt")
    p.add_argument("--feature", dest="features", action="append", required=True, metavar="ID=VALUE",
                   help="a feature and its value in units of its corpus maximum (0 switches it off); repeatable")
    p.add_argument("--mode", choices=MODES, default="clamp",
                   help="clamp the activation, or add the decoder direction (every --feature; the API sets it per feature)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--generated-only", action="store_true", help="steer only the generated tokens")
    for name in ("search", "neighbors", "feature", "features", "dictionaries", "contrast", "sql", "probe", "steer"):
        q = sub.choices[name]
        q.add_argument("--atlas", default=ATLAS_DEFAULT)
        q.add_argument("--json", action="store_true", help="JSON instead of a table")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return _COMMANDS[args.command](args)
    except UserError as e:
        print(f"featureatlas: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except QueryInterrupted as e:
        print(f"featureatlas: {e}", file=sys.stderr)
        return 1


def _ingest(args: argparse.Namespace) -> int:
    from featureatlas.ingest.pipeline import run_ingest
    from featureatlas.store.atlas import summarize

    cfg = _config_from(args)
    configure(threads=cfg.run.threads, training=True)
    manifest = run_ingest(cfg)
    print(json.dumps(manifest, indent=2, default=str) if args.json else summarize(manifest))
    return 0


def _label(args: argparse.Namespace) -> int:
    from featureatlas.ingest.labels.relabel import relabel

    if is_remote(args.atlas):
        raise BadParameter("--atlas", "re-labelling works on a local atlas; re-run `featureatlas ingest` with other label "
                                      "settings to change a remote one's labels (finished stages are reused)")
    _open(args.atlas)  # a clear error for a folder that is no atlas
    overrides = {"label_explainer": args.explainer, "label_scorers": args.scorer, "llm_url": args.llm_url,
                 "llm_model": args.llm_model, "llm_api_key_env": args.llm_api_key_env, "llm_max_calls": args.llm_max_calls}
    summary = relabel(str(local_path(args.atlas)), overrides, args.features)
    print(json.dumps(summary, indent=2) if args.json else
          f"labelled {summary['labelled']} features with {summary['explainer']}; {summary['scored']} scored on held-out "
          f"windows, mean {summary['scorers'][0]} score {summary['label_score_mean'] or float('nan'):.3f}; "
          f"{summary['failed']} failed LLM calls")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import torch
    from featureatlas.ingest import sweep
    from featureatlas.ingest.harvest import cached_split
    from featureatlas.store.manifest import CACHE

    configure(training=True)
    atlas = _open(args.atlas)
    if min(args.features) < 1:
        raise BadParameter("--features", "feature counts must be at least 1")
    if args.batch < 1 or min(args.tokens) < args.batch:
        raise BadParameter("--tokens", f"every token budget must be at least one batch ({args.batch})")
    if args.k < 1:
        raise BadParameter("--k", "must be at least 1")
    if not (atlas.root / CACHE / "harvest").is_dir():
        raise BadParameter("--atlas", f"{atlas.root}/{CACHE}/harvest is gone: re-run `featureatlas ingest` to rebuild it")
    cfg = config_of(atlas.manifest)
    train, held = cached_split(atlas.root / CACHE, cfg.harvest.shard_tokens)
    runs = sweep.run_grid(train, held, features=sorted(args.features), tokens=sorted(args.tokens), k=args.k,
                          batch=args.batch, seed=0, device=torch.device(cfg.run.device))
    target = args.target_compute or 100 * max(r.compute for r in runs)
    result = sweep.fit(runs, target)
    folder = atlas.root / "sweep" if args.out is None else Path(args.out)
    out = sweep.write(runs, result, folder)
    try:
        pngs = [str(p) for p in sweep.plot(runs, result, folder)]
    except ImportError:
        pngs = ["(no plots: matplotlib is not installed)"]
    law = result["fvu_vs_compute"]
    print(f"{len(runs)} runs; frontier: FVU = {law['a']:.3g} * C^{law['exponent']:.3f}")
    print(f"at C = {target:.3g} FLOPs: ~{result['optimal_features']:,.0f} features, ~{result['optimal_tokens']:,.0f} "
          f"tokens, predicted FVU {result['predicted_fvu']:.4f}")
    print("wrote", out, *pngs)
    return 0


def _open(location: str):
    from featureatlas.store.atlas import Atlas

    return Atlas(readable(location))


def _info(args: argparse.Namespace) -> int:
    from featureatlas.store.atlas import summarize

    atlas = _open(args.atlas)
    print(json.dumps(atlas.manifest, indent=2, default=str) if args.json else summarize(atlas.manifest))
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Open on loopback; beyond it, only with a token (the API runs SQL and the model for anyone)."""
    import uvicorn
    from featureatlas.api.app import HEAVY_THREADS, create_app
    from featureatlas.api.edge import TOKEN_ENV, check_token, is_loopback
    from featureatlas.api.live import RemoteFollower
    from threadpoolctl import threadpool_limits

    token = args.token or os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(args.host):
        raise BadParameter("--host", f"{args.host} is reachable beyond this machine: set a token in ${TOKEN_ENV} "
                                     "(or --token), or serve on 127.0.0.1")
    if token is not None:
        check_token(token)
    every = FOLLOW_EVERY_S if args.follow_every is None else args.follow_every
    if not 0 < every <= threading.TIMEOUT_MAX:  # NaN fails this too
        raise BadParameter("--follow-every", f"must be a number of seconds above 0, not {every:g}")
    if args.follow_every is not None and not is_remote(args.atlas):
        print("featureatlas: --follow-every is for s3:// atlases; a local atlas is followed at every request",
              file=sys.stderr)
    configure(threads=HEAVY_THREADS)  # the model and the embedder leave the cheap routes a core (api/app.py)
    follow = RemoteFollower(args.atlas, every) if is_remote(args.atlas) else None
    app = create_app(_open(args.atlas), probe_device=args.device, token=token, follow=follow)
    # A request's numpy products are small (a query against 4,096 vectors) and gain nothing from BLAS
    # threads, whose workers then spin for a while and take the cores from the embedder: MiniLM's
    # forward for one query took 33 ms after such a product instead of 16 (scripts/bench_serve.py).
    # Only while serving: a process that goes on (a test, a notebook) gets its threads back.
    with threadpool_limits(1, user_api="blas"):
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _query(args: argparse.Namespace) -> int:
    """The HTTP API's queries on the command line: the same service, the same checks and limits."""
    from featureatlas.api.service import AtlasService

    atlas = _open(args.atlas)
    try:
        result, header, rows = _QUERIES[args.command](AtlasService(atlas), args)
    finally:
        atlas.close()  # its SQL worker processes, if a query started them
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    if args.command == "search":
        print(_search_header(result))
    print(_table(header, rows))
    if result.get("truncated"):
        print(f"(truncated to {len(rows)} rows)")
    return 0


Rows = tuple[dict[str, Any], list[str], list[list[Any]]]  # the JSON answer, and its table for people


def _search(service: AtlasService, args: argparse.Namespace) -> Rows:
    result = service.search(args.query, args.k, args.mode, args.dictionary)
    rows = [[h["feature_id"], f"{h['evidence']:.1f}" + ("" if h["strong"] else " weak"), f"{h['density']:.4%}",
             _why(h["matched_by"]), _clip(h["label"], 70), h["snippet"]] for h in result["hits"]]
    return result, ["feature", "evidence", "density", "matched by", "label", "top example"], rows


def _dictionaries(service: AtlasService, args: argparse.Namespace) -> Rows:
    result = service.dictionaries()
    rows = [[d["dictionary"] + (" (default)" if d["is_default"] else ""), d["hook"], d["architecture"], d["d_sae"],
             f"{d['first_feature']}-{d['first_feature'] + d['d_sae'] - 1}", "" if d["k"] is None else d["k"],
             _metric(d["variance_explained"]), _metric(d["loss_recovered"]), _metric(d["l0"], "{:.1f}")]
            for d in result["dictionaries"]]
    header = ["dictionary", "hook", "architecture", "width", "feature ids", "k", "var. explained", "loss recovered", "L0"]
    return result, header, rows


def _metric(value: float | None, fmt: str = "{:.4f}") -> str:
    return "" if value is None else fmt.format(value)


def _neighbors(service: AtlasService, args: argparse.Namespace) -> Rows:
    result = service.neighbors(args.feature_id, args.k, args.by, args.dictionary)
    rows = [[n["feature_id"], f"{n['similarity']:.4f}", f"{n['density']:.4%}", n["label"]] for n in result["neighbors"]]
    return result, ["feature", "similarity", "density", "label"], rows


def _feature(service: AtlasService, args: argparse.Namespace) -> Rows:
    from featureatlas.api.service import snippet

    f = service.feature(args.feature_id)
    score = "unscored" if f["label_score"] is None else f"{f['label_score']:.3f}"
    rows = [["label", f["label"]], ["description", _clip(f["description"], 120)],
            ["label by", f"{f['label_source']} (score {score})"],
            ["density", f"{f['density']:.4%} of tokens ({f['n_active']:,})"],
            ["activation", f"max {f['max_activation']:.3g}, mean {f['mean_activation']:.3g} where it fires"]]
    rows += [[f"{e['kind']} {e['max_activation']:.3g}", _clip(snippet(e["tokens"], e["activations"]), 100)]
             for e in f["top_examples"] + f["quantile_examples"]]
    return f, ["", f"feature #{f['feature_id']}"], rows


def _features(service: AtlasService, args: argparse.Namespace) -> Rows:
    result = service.features(args.sort, args.order == "desc", args.limit, args.offset)
    rows = [[r["feature_id"], f"{r['density']:.4%}", f"{r['max_activation']:.3g}",
             "" if r["label_score"] is None else f"{r['label_score']:.3f}", _clip(r["label"], 70)] for r in result["features"]]
    return result, ["feature", "density", "max", "label score", "label"], rows


def _contrast(service: AtlasService, args: argparse.Namespace) -> Rows:
    result = service.contrast(args.positive, args.negative or [], args.k)
    rows = [[h["feature_id"], f"{h['score']:.3f}", f"{h['density']:.4%}", _clip(h["label"], 70)] for h in result["hits"]]
    return result, ["feature", "weakest relative activation", "density", "label"], rows


def _steer(service: AtlasService, args: argparse.Namespace) -> Rows:
    result = service.steer(args.prompt, _edits(args.features, args.mode), max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, seed=args.seed, chat=args.chat, generated_only=args.generated_only)
    rows = [["default", _clip(result["default"]["text"], 200)], ["steered", _clip(result["steered"]["text"], 200)]]
    rows += [[f"#{f['id']}", f"{f['mode']} {f['value']:g}x max ({f['max_activation']:.3g}): {_clip(f['label'], 80)}"]
             for f in result["features"]]
    return result, ["", "continuation of " + repr(_clip(args.prompt, 50))], rows


def _sql(service: AtlasService, args: argparse.Namespace) -> Rows:
    from featureatlas.store.sql import execute_sql

    result = execute_sql(service.atlas, args.sql).to_dict()
    return result, result["columns"], result["rows"]


def _probe(service: AtlasService, args: argparse.Namespace) -> Rows:
    result = service.activations(args.text, args.k)
    rows = [[repr(t["token"]), ", ".join(f"{f['feature_id']} ({f['value']:.2f}) {_clip(f['label'], 40)}"
                                         for f in t["features"])] for t in result["tokens"]]
    return result, ["token", "top features (activation) label"], rows


def _export(args: argparse.Namespace) -> int:
    from featureatlas.store.dictionaries import saelens_cfg, stacked_parts
    from featureatlas.store.export import export

    atlas = _open(args.atlas)
    if args.format == "saelens" and not stacked_parts(saelens_cfg(atlas)):
        from featureatlas.store.manifest import DICTIONARY

        # the top-level name, which follows republishing (a link to the current data folder's copy)
        print(f"the dictionary is in SAELens's layout already: {(atlas.root / DICTIONARY).absolute()} "
              "(sae_lens.SAE.load_from_disk reads it)")
        if args.out is None:
            return 0
    elif args.out is None:
        raise BadParameter("--out", f"give a folder to write the {args.format} export to")
    for path in export(atlas, args.format, Path(args.out)):
        print("wrote", path)
    return 0


def _edits(specs: list[str], mode: str) -> list[Edit]:
    """"812=10" -> Edit(812, 10.0, mode)."""
    out = []
    for spec in specs:
        fid, _, value = spec.partition("=")
        try:  # "812" alone leaves value "", which float refuses too
            out.append(Edit(int(fid), float(value), mode))
        except ValueError:
            raise BadParameter("--feature", f"expected ID=VALUE like 812=2, got {spec!r}") from None
    return out


def _search_header(result: dict) -> str:
    """The verdict first: found, or plainly not, with how much of the corpus is about the query."""
    cover = result["coverage"]
    amount = (f"{cover['windows']:,}{'+' if cover['capped'] else ''} of {cover['windows_total']:,} corpus windows "
              f"({cover['documents']:,} of {cover['documents_total']:,} documents) are about it")
    if result["confident"]:
        return f"Found features about {result['query']!r}; {amount}."
    return result["message"]


def _why(matched_by: dict[str, int]) -> str:
    return " ".join(f"{name}#{rank}" for name, rank in matched_by.items())


def _clip(text: str | None, width: int = 60) -> str:
    text = (text or "").replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_QUERIES = {"search": _search, "neighbors": _neighbors, "feature": _feature, "features": _features,
            "dictionaries": _dictionaries, "contrast": _contrast, "steer": _steer, "sql": _sql, "probe": _probe}
_COMMANDS = {"ingest": _ingest, "label": _label, "sweep": _sweep, "info": _info, "serve": _serve, "export": _export,
             **dict.fromkeys(_QUERIES, _query)}

if __name__ == "__main__":
    sys.exit(main())
