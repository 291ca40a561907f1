"""``featureatlas``: one command line for building, inspecting and serving atlases."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from featureatlas.ingest.config import AtlasConfig, ConfigError, PROFILES, load_config

EXIT_BAD_INPUT = 2

# CLI flags that override config fields: flag name -> (field, type, help).
_OVERRIDES: dict[str, tuple[type, str]] = {
    "atlas": (str, "atlas folder (default ./atlas)"),
    "model": (str, "'smollm2' (packaged GGUF), a .gguf file, or a local HF model folder"),
    "layer": (int, "hook layer: residual stream after this block (default n_layers // 2)"),
    "device": (str, "cpu or cuda"),
    "dtype": (str, "auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16"),
    "threads": (int, "torch CPU threads (0: torch's default)"),
    "tokens": (int, "tokens to harvest, train and held-out together"),
    "context_len": (int, "tokens per context, BOS included"),
    "eval_fraction": (float, "share of documents held out for metrics"),
    "d_sae": (int, "dictionary size (features)"),
    "k": (int, "active features per token"),
    "train_tokens": (int, "SAE training budget in tokens (epochs over the cache)"),
    "train_batch": (int, "SAE training batch"),
    "lr": (float, "Adam learning rate (default scales with d_sae)"),
    "seed": (int, "random seed"),
}


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="build an atlas: harvest, train, encode, label, publish")
    p.add_argument("--profile", default="quick", choices=sorted(PROFILES), help="named defaults (quick: the demo)")
    p.add_argument("--config", help="TOML file with AtlasConfig fields")
    p.add_argument("--corpus", nargs="+", help="sources: wiki, wiki-en, wiki-fr, wiki-es, shakespeare, python, or paths")
    p.add_argument("--corpus-weights", nargs="+", type=float, help="one mixing weight per source")
    for name, (typ, help_) in _OVERRIDES.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, help=help_)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def _config_from(args: argparse.Namespace) -> AtlasConfig:
    overrides: dict[str, Any] = {name: getattr(args, name) for name in _OVERRIDES}
    overrides["corpus"] = args.corpus
    overrides["corpus_weights"] = args.corpus_weights
    if args.corpus and not args.corpus_weights:
        overrides["corpus_weights"] = [1.0] * len(args.corpus)
    return load_config(args.profile, args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="featureatlas", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_ingest(sub)
    p = sub.add_parser("info", help="print an atlas's manifest summary")
    p.add_argument("--atlas", default=AtlasConfig.atlas)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("serve", help="serve an atlas over HTTP (Litestar; OpenAPI at /schema)")
    p.add_argument("--atlas", default=AtlasConfig.atlas)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"featureatlas: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _ingest(args: argparse.Namespace) -> int:
    from featureatlas.ingest.pipeline import run_ingest
    from featureatlas.store.atlas import summarize

    manifest = run_ingest(_config_from(args))
    print(json.dumps(manifest, indent=2, default=str) if args.json else summarize(manifest))
    return 0


def _info(args: argparse.Namespace) -> int:
    from featureatlas.store.atlas import Atlas, AtlasNotFound, summarize

    try:
        atlas = Atlas(args.atlas)
    except AtlasNotFound as e:
        raise ConfigError("--atlas", str(e)) from None
    print(json.dumps(atlas.manifest, indent=2, default=str) if args.json else summarize(atlas.manifest))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from featureatlas.api.app import create_app
    from featureatlas.store.atlas import Atlas, AtlasNotFound

    try:
        atlas = Atlas(args.atlas)
    except AtlasNotFound as e:
        raise ConfigError("--atlas", str(e)) from None
    uvicorn.run(create_app(atlas), host=args.host, port=args.port, log_level="info")
    return 0


_COMMANDS = {"ingest": _ingest, "info": _info, "serve": _serve}

if __name__ == "__main__":
    sys.exit(main())
