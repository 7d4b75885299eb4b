"""The README screenshot and its click-to-table time, with the shipped model in headless Chromium.

    python scripts/screenshot.py [--model FOLDER] [--threads 2] [--out docs/screenshot.png]

Starts `python app.py` (with its start-up warm-up, as a user gets it), uploads the browser test's clip with its
reference, presses "Run all variants" and saves the page. Needs Debian's chromium + chromium-driver and the test
extra (selenium); the page steps are the browser test's own (tests/test_browser.py), so the two cannot drift.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from test_browser import free_port, start_chromium, upload_and_run_all, wait_for_app  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="model folder (default: the shipped baseline)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshot.png"))
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "app.py", "--port", str(port), "--threads", str(args.threads)]
    app = subprocess.Popen(command + (["--model", args.model] if args.model else []), cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    browser = None
    try:
        # start-up loads the model and builds the default variants: up to 10 minutes, or until it exits
        if not wait_for_app(app, url, tries=1200):
            sys.exit(f"app.py exited with status {app.returncode}")
        browser = start_chromium()
        if browser is None:
            sys.exit("chromium/chromedriver not installed (Debian: apt-get install chromium chromium-driver)")
        browser.set_window_size(1400, 1900)
        status, rows, seconds = upload_and_run_all(browser, url)
        print(f"{status}\nclick to table: {seconds:.1f} s")
        for row in rows:
            print(" | ".join(row[:4]))
        time.sleep(2)  # let the chart finish drawing
        browser.save_screenshot(args.out)
        print(f"-> {args.out}")
    finally:
        if browser is not None:
            browser.quit()
        app.terminate()
        app.wait(timeout=30)


if __name__ == "__main__":
    main()
