"""Screenshots of every view of the UI on a real atlas, light and dark, desktop and phone width.

    .venv/bin/python scripts/screenshots.py --atlas atlas --out docs/ui [--feature 812] [--query "Golden Gate Bridge"]
        [--steer 812:2:clamp ...]

Serves the atlas on loopback, opens each view in headless Chromium (Debian's /usr/bin/chromium),
waits until its data is on screen and writes one PNG per view.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import quote

from bench_search import serving
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", default="atlas")
    p.add_argument("--out", default="docs/ui")
    p.add_argument("--feature", type=int, default=812)
    p.add_argument("--query", default="Golden Gate Bridge")
    p.add_argument("--probe", default="The Golden Gate Bridge spans the strait into San Francisco Bay.")
    p.add_argument("--steer", nargs="+", help="features the Steer view steers, ID:VALUE:MODE (default: --feature at 2x)")
    p.add_argument("--steer-prompt", default="My favourite food is")
    args = p.parse_args()
    steered = "&".join(f"f={quote(f)}" for f in args.steer or [f"{args.feature}:2:clamp"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    views = [
        ("home", "/", "home"),
        ("search", f"/search?q={quote(args.query)}", "search"),
        ("feature", f"/features/{args.feature}", "feature"),
        ("probe", f"/probe?text={quote(args.probe)}", "probe"),
        ("map", "/map", "map"),
        ("map-neighbours", f"/map?feature={args.feature}", "map"),
        ("steer", f"/steer?{steered}&prompt={quote(args.steer_prompt)}", "steer"),
    ]
    with serving(Path(args.atlas)) as (base, _), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        for suffix, size, scheme in (("", (1280, 900), "light"), ("-phone-dark", (390, 844), "dark")):
            page = browser.new_page(viewport={"width": size[0], "height": size[1]}, color_scheme=scheme)
            for name, path, view in views:
                page.goto(base + path)
                page.wait_for_function(f"['{view}', 'error'].includes(document.body.dataset.ready)", timeout=120_000)
                page.screenshot(path=str(out / f"{name}{suffix}.png"))
                print(out / f"{name}{suffix}.png")
            page.close()
        browser.close()


if __name__ == "__main__":
    main()
