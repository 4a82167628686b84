"""`dvc plots show` as a page that works offline, each plot once, optionally checked in a headless browser.

    python scripts/plots_page.py [-o dvc_plots] [--check]

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so on a machine without network its
interactive plots are blank. This writes an HTML template whose one script is the bundle that the
installed `vl-convert-python` package carries (vega-embed, vega-lite and vega, nothing fetched), and
renders the page with `dvc plots show --html-template`. With --check the page is opened in headless
Chromium (Debian's `chromium`): every vega plot must have drawn (an <svg> or <canvas> in its div) and
every PNG must appear exactly once; the exit status says whether it did.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plots (offline)</title>
    <script>__BUNDLE__</script>
    <style>table { border-spacing: 15px; }</style>
</head>
<body>
    {plot_divs}
</body>
</html>"""
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def template() -> str:
    import vl_convert

    # The default snippet puts vegaEmbed, vegaLite and vega on window, which is what DVC's divs call.
    return PAGE.replace("__BUNDLE__", vl_convert.javascript_bundle().replace("</script", "<\\/script"))


def render(out_dir: Path, dvc: str = "dvc") -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        tmpl = Path(tmp) / "template.html"
        tmpl.write_text(template(), encoding="utf8")
        subprocess.run([dvc, "plots", "show", "--html-template", str(tmpl), "-o", str(out_dir)], check=True,
                       stdout=subprocess.DEVNULL)
    return out_dir / "index.html"


def browser() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


def check(page: Path, exe: str) -> list[str]:
    """Problems found in the page as headless Chromium rendered it (empty: every plot is there)."""
    html = page.read_text(encoding="utf8")
    # The page without its inline bundle: what DVC put in it.
    body = re.sub(r"<script>.*?</script>", "<script></script>", html, count=1, flags=re.S)
    problems = [f"loads {src} from the network" for src in re.findall(r'<script[^>]+src="([^"]+)"', body)]
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom",
                              page.resolve().as_uri()], capture_output=True, text=True, timeout=300).stdout
    ids = re.findall(r"vegaEmbed\('#([^']+)'", body)
    starts = [dom.find(f'id="{i}"') for i in ids]
    for k, (div, start) in enumerate(zip(ids, starts)):
        end = next((s for s in starts[k + 1 :] if s > start), len(dom))
        if start < 0 or not re.search(r"<(svg|canvas)\b", dom[start:end]):
            problems.append(f"vega plot {div} did not draw")
    pngs = re.findall(r"<p>([^<]+\.png)</p>", body)
    problems += [f"{p} is shown {pngs.count(p)} times" for p in sorted(set(pngs)) if pngs.count(p) > 1]
    problems += [f"image {src} is missing" for src in re.findall(r'<img src="([^"]+)"', body)
                 if not (page.parent / src).exists()]
    print(f"{page}: {len(ids)} vega plots, {len(pngs)} PNGs")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", default="dvc_plots")
    ap.add_argument("--check", action="store_true", help="open the page in headless Chromium and check every plot")
    args = ap.parse_args()
    page = render(Path(args.out), str(Path(sys.executable).parent / "dvc"))
    print(f"wrote {page} (offline: scripts from vl-convert-python)")
    if args.check:
        exe = browser()
        if exe is None:
            sys.exit("--check: no chromium found (Debian: apt-get install chromium)")
        problems = check(page, exe)
        for p in problems:
            print(f"problem: {p}")
        if problems:
            sys.exit(1)
        print("every plot drew, each PNG once")


if __name__ == "__main__":
    main()
