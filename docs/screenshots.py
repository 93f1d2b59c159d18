"""Make the documentation's pictures again: run the examples, open their logs in TensorBoard, capture the pages.

``make screenshots`` (or ``.venv/bin/python docs/screenshots.py``) runs the collapse demo and the digits example
into a temporary directory, starts TensorBoard on their logs, captures three views with headless Chromium
(Debian's ``chromium`` package: ``apt-get install -y chromium``) and writes them, cropped and palette-compressed
below 150 KB each, to ``docs/images/``:

- ``custom_scalars.png``: the CUSTOM SCALARS tab of the demo's collapse run (shares, raw values, balance);
- ``shares_stacked.png``: the IMAGES tab, ``mc/shares_stacked`` of the same run;
- ``patch_heatmap.png``: the IMAGES tab, ``mc_attributes/patch_heatmap`` of the digits example.

Not part of CI (CI has no Chromium); the images are committed. Takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 150_000
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
]


def run_examples(logs: Path) -> None:
    """The demo's collapse run (its balanced control is not pictured) and the digits example, logging into ``logs``."""
    python = sys.executable
    commands = [
        [python, "examples/collapse_demo.py", "--skip-control", "--logdir", str(logs / "collapse_demo")],
        [python, "examples/digits_patches.py", "--out", str(logs / "digits_patches")],
    ]
    for command in commands:
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def free_port() -> int:
    """A TCP port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def tensorboard(logdir: Path, expected_runs: int) -> Iterator[str]:
    """TensorBoard on ``logdir`` until the block ends; yields its URL once every run's data is loaded.

    It is started from the directory above ``runs/`` with a relative ``--logdir``, so the page shows
    ``runs/collapse_demo/collapse``, as a user's would, and no path of this machine.
    """
    port = free_port()
    top = next(parent for parent in logdir.parents if parent.name == "runs").parent
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir.relative_to(top))]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--host", "127.0.0.1"],
        cwd=top,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as response:
                    if len(json.load(response)) >= expected_runs:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"TensorBoard on {logdir} did not come up at {url}")
            time.sleep(1)
        time.sleep(3)  # let the reloader read the event files completely
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def capture(url: str, path: Path, size: tuple[int, int], scale: int, profile: Path) -> None:
    """A headless Chromium screenshot of ``url`` (``size`` in CSS pixels, ``scale`` device pixels per CSS pixel)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("docs/screenshots.py needs Chromium: apt-get update && apt-get install -y chromium")
    command = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}",
        f"--force-device-scale-factor={scale}",
        "--virtual-time-budget=20000",
        f"--screenshot={path}",
        url,
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)


def first_card(image: Any, top: int, left: int) -> tuple[int, int, int, int]:
    """The box of the first TensorBoard card below ``top`` and right of ``left`` (device pixels), trimmed to its ink.

    The card is white on the page's grey: its rows and columns are those that hold pure white.
    """
    import numpy as np

    pixels = np.asarray(image.convert("L"))[top:, left:]
    white_rows = np.flatnonzero((pixels == 255).any(axis=1))
    if not len(white_rows):
        raise SystemExit("no TensorBoard card found in the screenshot")
    start = white_rows[0]
    gaps = np.flatnonzero(~(pixels[start:] == 255).any(axis=1))
    stop = start + (gaps[0] if len(gaps) else pixels.shape[0] - start)
    card = pixels[start:stop]
    columns = np.flatnonzero((card == 255).any(axis=0))
    card = card[:, columns[0] : columns[-1] + 1]
    ink_rows = np.flatnonzero((card < 200).any(axis=1))
    ink_columns = np.flatnonzero((card < 200).any(axis=0))
    pad = 12
    return (
        left + columns[0] + max(ink_columns[0] - pad, 0),
        top + start + max(ink_rows[0] - pad, 0),
        left + columns[0] + min(ink_columns[-1] + pad, card.shape[1]),
        top + start + min(ink_rows[-1] + pad, card.shape[0]),
    )


def save_small(source: Path, box: tuple[int, int, int, int] | None, scale: int, target: Path) -> int:
    """Crop ``box`` out of ``source``, compress it to a 128-colour palette PNG; returns its size in bytes.

    ``box`` is in CSS pixels; ``None`` takes the first card of an IMAGES page.
    """
    from PIL import Image

    with Image.open(source) as image:
        rgb = image.convert("RGB")
        if box is None:  # below the "Tags matching" header, right of the side bar (a 1000 px wide window)
            device_box = first_card(rgb, top=scale * 175, left=scale * 260)
        else:
            device_box = tuple(scale * value for value in box)
        small = rgb.crop(device_box).quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        target.parent.mkdir(parents=True, exist_ok=True)
        small.save(target, optimize=True)
    size = target.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{target} is {size} bytes, over the {MAX_BYTES} the docs allow; shrink the crop")
    return size


def main() -> None:
    """Run the examples, capture the three views, write them to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where the PNGs go")
    parser.add_argument(
        "--logs",
        type=Path,
        default=None,
        help="use the logs of an earlier run (a directory named runs/ with collapse_demo/ and digits_patches/)"
        " instead of running the examples again",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lightning-mc-screenshots-") as scratch:
        scratch_dir = Path(scratch)
        logs = args.logs.resolve() if args.logs is not None else scratch_dir / "runs"
        if args.logs is None:
            run_examples(logs)
        views = [
            # (log directory, TensorBoard page, file, window size, scale, crop box in CSS pixels or None: the card)
            (
                logs / "collapse_demo" / "collapse",
                "#custom_scalars",
                "custom_scalars.png",
                (1280, 780),
                1,
                (0, 0, 1280, 770),
            ),
            (
                logs / "collapse_demo" / "collapse",
                "#images&tagFilter=shares_stacked",
                "shares_stacked.png",
                (1000, 800),
                2,
                None,
            ),
            (
                logs / "digits_patches",
                "#images&tagFilter=patch_heatmap",
                "patch_heatmap.png",
                (1000, 800),
                2,
                None,
            ),
        ]
        for logdir, page, name, size, scale, box in views:
            with tensorboard(logdir, expected_runs=1) as url:
                raw = scratch_dir / f"raw-{name}"
                capture(f"{url}/?darkMode=false{page}", raw, size, scale, scratch_dir / "chromium-profile")
            written = save_small(raw, box, scale, args.out / name)
            print(f"wrote {args.out / name} ({written // 1000} KB)", flush=True)


if __name__ == "__main__":
    main()
