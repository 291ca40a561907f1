"""Browser speed of the UI, in headless Chromium on loopback: a feature page's first render on a
16k-feature atlas, and the map's first draw and its frame time while panning and zooming, with 16k
and with 100k points (or any number: ``--map-features 1000000 --page-features 0`` for the map at a
million alone). A map of more than one level of detail (``store.map_view.map_levels``) reports its
first draw and, as ``all_levels``, the draw with every point in; frames are measured after that
(a frame while the view moves draws a sample of a big map, ``full_frame_p50_ms`` every point).

    .venv/bin/python scripts/bench_ui.py --out ui.json [--screenshots DIR] [--workdir DIR]

Both atlases are synthetic but full-sized where it matters: every feature of the page atlas has 20
top and 8 quantile examples of 32 tokens, a 24-bin histogram, 10+10 logit effects and a dictionary
(so the page's neighbour lists run as on a real atlas); the map atlas has 100k points in clusters.
Times are read from the page itself: ``performance.mark`` when the view's data is on screen,
measured from the start of navigation (HTML, scripts, API calls and drawing included), and a
``performance.measure`` per map frame. The baseline
in the same run is the server alone: the same API calls the page makes, over HTTP, without a browser.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import torch
from bench_search import D_MODEL, WORDS, build_atlas, serving, synthetic_features
from featureatlas.ingest.sae import SAE
from featureatlas.store.schema import EXAMPLES
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
TOP, QUANTILE, WINDOW, PEAK = 20, 8, 32, 24
BINS, LOGITS = 24, 10
# The server builds the map document in the background when it starts (~1.5 s at 100k features);
# a visitor who comes later than this finds it ready. The first load in the report still includes
# the browser's cold start.
MAP_WARMUP_S = 5
REST_MS = 600  # after the last key: past the map's SETTLE_MS, and the full draw itself


def page_atlas_parts(n: int, seed: int = 0) -> tuple[pa.Table, pa.Table, SAE]:
    """Features with histograms and logit effects, their examples, and a dictionary whose decoder
    is the features' decoder."""
    rng = np.random.default_rng(seed)
    features, decoder = synthetic_features(n, seed)
    vocab = np.array([f" {w}" for w in WORDS] + [".", ",", "\n", " the", " of"], dtype=object)
    counts = (rng.pareto(1.5, (n, BINS)) * 50).astype(np.int64)
    logit = pa.list_(pa.struct([("token", pa.string()), ("value", pa.float32())]))
    logits = lambda sign: pa.array([[{"token": str(t), "value": float(sign * v)} for t, v in  # noqa: E731
                                     zip(rng.choice(vocab, LOGITS), np.sort(rng.random(LOGITS))[::-1])] for _ in range(n)], logit)
    features = features.set_column(features.schema.get_field_index("histogram"), "histogram",
                                   pa.array(list(counts), pa.list_(pa.int64())))
    features = features.set_column(features.schema.get_field_index("logit_positive"), "logit_positive", logits(1))
    features = features.set_column(features.schema.get_field_index("logit_negative"), "logit_negative", logits(-1))

    per = TOP + QUANTILE
    rows = n * per
    bands = np.r_[np.ones(TOP), np.linspace(0.2, 0.9, QUANTILE)]  # top examples peak at the max, quantiles below
    peak = np.repeat(features["max_activation"].to_numpy(), per) * np.tile(bands, n)
    acts = np.clip(rng.exponential(0.15, (rows, WINDOW)) - 0.2, 0, None) * peak[:, None]
    acts[:, PEAK] = peak
    words = pa.DictionaryArray.from_arrays(rng.integers(0, len(vocab), rows * WINDOW).astype(np.int32), pa.array(vocab.tolist()))
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * WINDOW)
    examples = pa.table({
        "feature_id": np.repeat(np.arange(n, dtype=np.int32), per),
        "kind": np.tile(np.array(["top"] * TOP + ["quantile"] * QUANTILE), n),
        "doc_id": rng.integers(0, 5000, rows).astype(np.int32),
        "start": rng.integers(0, 1000, rows).astype(np.int32),
        "tokens": pa.ListArray.from_arrays(offsets, words.cast(pa.string())),
        "activations": pa.ListArray.from_arrays(offsets, pa.array(acts.astype(np.float32).ravel())),
        "max_activation": peak.astype(np.float32),
        "max_position": np.full(rows, PEAK, np.int32),
    }).cast(EXAMPLES.arrow())

    sae = SAE(D_MODEL, n, 32)
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(decoder))
        sae.W_enc.copy_(torch.from_numpy(decoder.T.copy()))
    return features, examples, sae


def browser_times(base: str, paths: list[str], marks: list[str], shots: Path | None, shot_name: str) -> dict[str, list[float]]:
    """Milliseconds from navigation start to each of ``marks`` (in the order the page sets them) for
    each path, one fresh page (same browser, so scripts come from its cache after the first) per
    path; fails on any console error."""
    times: dict[str, list[float]] = {m: [] for m in marks}
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        for i, path in enumerate(paths):
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + path)
            last = f"performance.getEntriesByName('fa:{marks[-1]}').length"
            # A function, not an expression: polling evaluates an expression with eval, which the CSP refuses.
            failed = "['error', 'map-error'].includes(document.body.dataset.ready)"
            page.wait_for_function(f"() => {last} || {failed}", timeout=60_000)
            if page.evaluate("document.body.dataset.ready") in ("error", "map-error"):
                raise RuntimeError(f"{path}: {page.inner_text('main')}")
            for m in marks:
                times[m].append(page.evaluate(f"performance.getEntriesByName('fa:{m}')[0].startTime"))
            if "map" in marks:  # a frame's cost while zooming and panning from the keyboard, all levels in
                page.focus("#map-canvas")
                for key in ["+", "ArrowLeft", "+", "ArrowUp", "-", "ArrowRight", "-", "ArrowDown"] * 2:
                    page.keyboard.press(key)
                    page.wait_for_timeout(50)
                page.wait_for_timeout(REST_MS)  # the whole map is drawn again once the view rests
                drawn = page.evaluate(f"performance.getEntriesByName('fa:draw').filter(e => e.startTime > "
                                      f"performance.getEntriesByName('fa:{marks[-1]}')[0].startTime)"
                                      ".map(e => [e.duration, e.detail.points])")
                most = max(p for _, p in drawn)  # a frame while moving draws a sample of a big map
                times.setdefault("frame", []).extend(d for d, _ in drawn)
                times.setdefault("full_frame", []).extend(d for d, p in drawn if p == most)
            if shots and i == 0:
                page.screenshot(path=str(shots / f"{shot_name}.png"))
            page.close()
        browser.close()
    if errors:
        raise RuntimeError(f"console errors: {errors[:5]}")
    return times


def api_times(base: str, calls: list[list[str]]) -> list[float]:
    """The baseline: the same API calls a view makes, in sequence over HTTP, without a browser."""
    out = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for urls in calls:
            t0 = time.perf_counter()
            for u in urls:
                client.get(u).raise_for_status()
            out.append((time.perf_counter() - t0) * 1000)
    return out


def stats(xs: list[float]) -> dict[str, float]:
    return {"first_ms": xs[0], "p50_ms": float(np.percentile(xs[1:], 50)), "p90_ms": float(np.percentile(xs[1:], 90)),
            "runs": len(xs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--page-features", type=int, default=16_384, help="0: the map alone")
    p.add_argument("--map-features", type=int, default=100_000)
    p.add_argument("--pages", type=int, default=20, help="feature pages loaded (the first is reported apart)")
    p.add_argument("--maps", type=int, default=5, help="map loads (the first is reported apart)")
    p.add_argument("--workdir", help="keep the synthetic atlases here and reuse them (default: a temp folder)")
    p.add_argument("--screenshots", help="save a screenshot of each view here")
    p.add_argument("--out")
    args = p.parse_args()
    if args.maps < 2 or (args.page_features and args.pages < 2):
        p.error("--maps and --pages need at least 2: the first load is reported apart from the rest")
    shots = Path(args.screenshots) if args.screenshots else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        page_root, map_root = work / f"ui-page-{args.page_features}", work / f"ui-map-{args.map_features}"
        if args.page_features and not (page_root / "manifest.json").is_file():
            build_atlas(page_root, *page_atlas_parts(args.page_features))
        if not (map_root / "manifest.json").is_file():
            build_atlas(map_root, synthetic_features(args.map_features)[0])

        maps = [(map_root, args.map_features)]
        if args.page_features:
            ids = np.random.default_rng(1).integers(0, args.page_features, args.pages).tolist()
            with serving(page_root) as (base, _):
                page_ms = browser_times(base, [f"/features/{i}" for i in ids], ["feature", "feature-complete"], shots, "feature")
                api_ms = api_times(base, [[f"/api/features/{i}", f"/api/features/{i}/neighbors?by=decoder&k=10",
                                           f"/api/features/{i}/neighbors?by=coactivation&k=10"] for i in ids])
            result["feature_page"] = {"features": args.page_features, **stats(page_ms["feature"]),
                                      "with_neighbours": stats(page_ms["feature-complete"]), "api_only": stats(api_ms)}
            maps.insert(0, (page_root, args.page_features))

        result["map"] = {}
        for root, n in maps:
            with serving(root) as (base, _):
                time.sleep(MAP_WARMUP_S)
                levels = len(httpx.get(f"{base}/api/map/head", timeout=600).json()["levels"])
                # The first level is the first draw; with more, frames are measured once all are in.
                marks = ["map", "map-full"] if levels > 1 else ["map"]
                map_ms = browser_times(base, ["/map"] * args.maps, marks, shots, f"map-{n}")
                api_ms = api_times(base, [["/api/map/head", *(f"/api/map/points/{i}" for i in range(levels))]] * args.maps)
            result["map"][str(n)] = {**stats(map_ms["map"]), "levels": levels, "api_only": stats(api_ms),
                                     "frame_p50_ms": float(np.percentile(map_ms["frame"], 50)),
                                     "frame_p90_ms": float(np.percentile(map_ms["frame"], 90)),
                                     "full_frame_p50_ms": float(np.percentile(map_ms["full_frame"], 50))}
            if levels > 1:
                result["map"][str(n)]["all_levels"] = stats(map_ms["map-full"])
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
