"""`dvc plots show` as a page that works offline, each plot once, optionally checked in a headless browser.

    python scripts/plots_page.py [-o dvc_plots] [--check]

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so on a machine without network its
interactive plots are blank. This writes an HTML template whose one script is the bundle that the
installed `vl-convert-python` package carries (vega-embed, vega-lite and vega, nothing fetched), and
renders the page with `dvc plots show --html-template`. Below the plots, a listening table (from the
evaluate stage's plots/listen): for a few test utterances, the original and the speech rebuilt
from each source of units side by side, with transcripts and WER. With --check the page is opened in
headless Chromium (Debian's `chromium`): every vega plot must have drawn (an <svg> or <canvas> in its
div), every PNG must appear exactly once, and every audio element must have loaded with the duration of
its file; the exit status says whether it did.
"""

from __future__ import annotations

import argparse
import html
import json
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
# Each audio element says, in the DOM Chromium dumps, the duration it loaded (or that it failed).
AUDIO_PROBE = """<script>
document.querySelectorAll('audio').forEach(function (a) {
  a.addEventListener('loadedmetadata', function () { a.setAttribute('data-loaded-s', a.duration.toFixed(3)); });
  a.addEventListener('error', function () { a.setAttribute('data-loaded-s', 'error'); });
  a.load();
});
</script>"""


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


def listening_table(listen_dir: Path, out_dir: Path) -> str:
    """The listening section: one row per utterance, one cell per source (audio, transcript, WER); the
    audio copied beside the page. Empty when evaluate wrote no listening set."""
    index = listen_dir / "index.json"
    if not index.exists():
        return ""
    rows = json.loads(index.read_text())
    if not rows:
        return ""
    sources = [e["source"] for e in rows[0]["sources"]]
    head = "".join(f"<th>{html.escape(s)}</th>" for s in sources)
    body = []
    for r in rows:
        cells = []
        for e in r["sources"]:
            dest = out_dir / "listen" / e["file"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(listen_dir / e["file"], dest)
            cells.append(f'<td><audio controls preload="metadata" src="listen/{html.escape(e["file"])}" '
                         f'data-seconds="{e["seconds"]:.3f}"></audio><br><small>{html.escape(e["transcript"])}'
                         f'<br>WER {100 * e["wer"]:.0f} %</small></td>')
        body.append(f"<tr><td><b>{html.escape(r['utt_id'])}</b><br><small>{html.escape(r['reference'])}</small></td>"
                    + "".join(cells) + "</tr>")
    return ("<h2>Listen: speech rebuilt from units (test utterances)</h2><p>The original, the vocoder's ceiling "
            "(true units), and each variant's free-running units, rebuilt by the vocoder stage's decoder and "
            "Griffin-Lim; transcripts by Whisper (greedy).</p>"
            f"<table><tr><th>utterance (reference)</th>{head}</tr>{''.join(body)}</table>{AUDIO_PROBE}")


def add_listening(page: Path, listen_dir: Path) -> int:
    section = listening_table(listen_dir, page.parent)
    if section:
        text = page.read_text(encoding="utf8")
        i = text.rfind("</body>")
        page.write_text(text[:i] + section + text[i:], encoding="utf8")
    return section.count("<audio")


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
    for tag in re.findall(r"<audio\b[^>]*>", dom):
        src, want = re.search(r'src="([^"]+)"', tag).group(1), float(re.search(r'data-seconds="([^"]+)"', tag).group(1))
        got = re.search(r'data-loaded-s="([^"]+)"', tag)
        if got is None or got.group(1) == "error":
            problems.append(f"audio {src} did not load")
        elif abs(float(got.group(1)) - want) > 0.02:
            problems.append(f"audio {src} is {got.group(1)} s, its file {want:.3f} s")
    pngs = re.findall(r"<p>([^<]+\.png)</p>", body)
    problems += [f"{p} is shown {pngs.count(p)} times" for p in sorted(set(pngs)) if pngs.count(p) > 1]
    problems += [f"image {src} is missing" for src in re.findall(r'<img src="([^"]+)"', body)
                 if not (page.parent / src).exists()]
    print(f"{page}: {len(ids)} vega plots, {len(pngs)} PNGs, {body.count('<audio')} audio elements")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", default="dvc_plots")
    ap.add_argument("--check", action="store_true", help="open the page in headless Chromium and check every plot")
    ap.add_argument("--listen", default="plots/listen", help="the evaluate stage's listening set")
    args = ap.parse_args()
    page = render(Path(args.out), str(Path(sys.executable).parent / "dvc"))
    print(f"wrote {page} (offline: scripts from vl-convert-python)")
    n = add_listening(page, Path(args.listen))
    print(f"listening table: {n} audio elements" if n else f"no listening set in {args.listen}")
    if args.check:
        exe = browser()
        if exe is None:
            sys.exit("--check: no chromium found (Debian: apt-get install chromium)")
        problems = check(page, exe)
        for p in problems:
            print(f"problem: {p}")
        if problems:
            sys.exit(1)
        print("every plot drew, each PNG once, every audio loaded")


if __name__ == "__main__":
    main()
