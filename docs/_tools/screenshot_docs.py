"""Screenshot pages of the built site with headless Chromium, to look at what readers see.

    make docs && .venv/bin/python docs/_tools/screenshot_docs.py [--out DIR] [PAGE ...]

Serves ``site/`` on a free loopback port (so the pages load as they would from a server,
search index included) and writes one PNG per page. Needs Debian's ``chromium``.
"""

import argparse
import functools
import http.server
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = ('index.html', 'api.html', 'delivery.html')
FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--hide-scrollbars')


def main() -> None:
    args = _parser().parse_args()
    browser = shutil.which('chromium') or shutil.which('chromium-browser')
    if browser is None:
        raise SystemExit('chromium not found: apt-get install -y chromium')
    site = ROOT / 'site'
    if not (site / 'index.html').exists():
        raise SystemExit('no built site: run make docs first')
    args.out.mkdir(parents=True, exist_ok=True)
    handler = functools.partial(_QuietHandler, directory=str(site))
    with http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        for page in args.pages or PAGES:
            shot = args.out / (page.replace('/', '_').removesuffix('.html') + '.png')
            _screenshot(browser, f'http://127.0.0.1:{port}/{page}', shot, args.size)
            print(f'{shot} ({shot.stat().st_size // 1024} KiB)')
        server.shutdown()


def _screenshot(browser: str, url: str, shot: Path, size: str) -> None:
    with tempfile.TemporaryDirectory() as profile:  # a new empty profile every time
        subprocess.run([browser, *FLAGS, f'--user-data-dir={profile}', f'--window-size={size}',
                        f'--screenshot={shot}', url],
                       check=True, capture_output=True, timeout=120)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('pages', nargs='*', help=f'paths under site/ (default: {" ".join(PAGES)})')
    parser.add_argument('--out', type=Path, default=Path(tempfile.gettempdir()) / 'microagent_mq-docs',
                        help='where the PNGs go (default: %(default)s)')
    parser.add_argument('--size', default='1280,1000', help='window WIDTH,HEIGHT (default %(default)s)')
    return parser


if __name__ == '__main__':
    main()
