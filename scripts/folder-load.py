"""How long a folder data set takes to load, and its peak memory: `python scripts/folder-load.py`.

Writes N real Fashion-MNIST training images as colour PNGs of another size, one folder per class
(once; `--out` keeps them), then reads the folder as a study does (`hpo.learn.sources.load`) in a fresh
process, `--repeats` times, and prints the wall time and the process's peak resident memory beside
the same figures for importing hpo alone (the baseline in the same run).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

MEASURE = """
import json, resource, sys, time
from pathlib import Path
started = time.perf_counter()
from hpo.learn import sources
from hpo.settings.config import DataSettings
imported = time.perf_counter()
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] != "import-only":
    settings = DataSettings(source="folder", path=sys.argv[1], image_size=int(sys.argv[2]), channels=3)
    dataset = sources.load(settings, Path(sys.argv[1]), seed=0)
    n = len(dataset.train) + len(dataset.test)
else:
    n = 0
print(json.dumps({"images": n, "import_s": imported - started, "load_s": time.perf_counter() - imported,
                  "import_rss_mb": base_rss / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_folder(out: Path, n: int, side: int) -> None:
    import numpy as np
    from PIL import Image

    from hpo.learn import data

    images, labels = data.load_split(data.find_data_dir(), "train")
    per_class = -(-n // len(data.CLASSES))
    for label, name in enumerate(data.CLASSES):
        folder = out / name.replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            Image.fromarray(images[index]).resize((side, side)).convert("RGB").save(folder / f"{i:05d}.png")


def cpu() -> str:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    flags = text.split("Flags:", 1)[-1]
    kind = "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else "AVX2 only"
    return f"{model} ({kind}), {platform.machine()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--side", type=int, default=64, help="pixels per side of the PNG files")
    parser.add_argument("--image-size", type=int, default=32, help="[data] image_size the study reads them at")
    parser.add_argument("--out", type=Path, default=Path("runs/folder-load"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.out.is_dir():
        started = time.perf_counter()
        write_folder(args.out, args.images, args.side)
        took = time.perf_counter() - started
        print(f"wrote {args.images:,} PNGs of {args.side}x{args.side} RGB to {args.out} in {took:.0f}s")
    runs: dict[str, list[dict]] = {"import-only": [], "load": []}
    for _ in range(args.repeats):
        for kind, target in (("import-only", "import-only"), ("load", str(args.out))):
            command = [sys.executable, "-c", MEASURE, target, str(args.image_size)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[kind].append(json.loads(out.splitlines()[-1]))
    loads = sorted(r["load_s"] for r in runs["load"])
    peaks = sorted(r["peak_rss_mb"] for r in runs["load"])
    base = sorted(r["peak_rss_mb"] for r in runs["import-only"])
    n = runs["load"][0]["images"]
    print(f"CPU: {cpu()}")
    print(
        f"folder of {n:,} PNGs ({args.side}x{args.side} RGB) read at image_size {args.image_size}, "
        f"{args.repeats} runs: "
        f"load {loads[len(loads) // 2]:.1f}s median (range {loads[0]:.1f}-{loads[-1]:.1f}s, "
        f"{n / loads[len(loads) // 2]:,.0f} images/s); peak RSS {peaks[len(peaks) // 2]:.0f} MB "
        f"against {base[len(base) // 2]:.0f} MB for importing hpo alone; the decoded images take "
        f"{n * 3 * args.image_size**2 / 2**20:.0f} MB as uint8"
    )


if __name__ == "__main__":
    main()
