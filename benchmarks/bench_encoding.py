"""Encoding: a 1080x1920 image in each format the node offers, time and bytes, against
SaveImage's own PNG encoding.

Target (issue 7): time and bytes of png (SaveImage's compress_level 4), webp and jpeg (the
node's default quality 90); the node's png costs no more than SaveImage's (design.md); a
recommended default for social-media output.

Method, part 1 (always, in this process): the node's path (executor.images.to_uint8_batch +
encode + write the file) for each format, against SaveImage's path as ComfyUI 0.3.64/0.33
write it (255*image -> clip -> uint8 -> PNG compress_level=4 with the prompt in a text
chunk -> file). Median of N runs each, interleaved.
Part 2 (real ComfyUI only): the same image through ComfyUI: LoadImage -> SaveImage via
POST /prompt, and LoadImage -> SaveAndCallback(format) via POST /execute-workflow; the
execution span (execution_start -> execution_success in the history) per prompt, median.
LoadImage is cached after the first run, so the span is the output node plus overhead.

The image: a deterministic synthetic 1080x1920 picture (smooth colour fields, texture and
grain, roughly what a diffusion model's output compresses like), or --image PATH
(centre-cropped to 9:16 and resized to 1080x1920).

    python benchmarks/bench_encoding.py [--quick] [--standin] [--image PATH] [--runs N]
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import use_repo_package  # noqa: E402
from client import RawClient, history_span, http_json, submit_job, submit_prompt, unique_id  # noqa: E402
from options import BenchParser, TempDir, comfy_dir_of  # noqa: E402
from report import print_header, table, write_json  # noqa: E402
from servers import start_server  # noqa: E402
from stats import p50  # noqa: E402
from workflows import workflow  # noqa: E402

WIDTH, HEIGHT = 1080, 1920
FORMATS = ("png", "webp", "jpeg")
QUALITY = 90


def synthetic_image(seed: int = 7) -> Any:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    for grid, weight in (((8, 5), 0.55), ((40, 23), 0.25), ((240, 135), 0.12), ((960, 540), 0.05)):
        small = (rng.random((*grid, 3)) * 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(small).resize((WIDTH, HEIGHT), Image.BICUBIC), np.float32)
        out += weight * big / 255.0
    out /= 0.97
    out += rng.normal(0, 2.0 / 255, out.shape).astype(np.float32)
    return np.clip(out, 0, 1)


def load_image(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if w / h > WIDTH / HEIGHT:
            cw = int(h * WIDTH / HEIGHT)
            im = im.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
        else:
            ch = int(w * HEIGHT / WIDTH)
            im = im.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))
        im = im.resize((WIDTH, HEIGHT), Image.LANCZOS)
        return np.asarray(im, np.float32) / 255.0


def save_image_like_comfyui(images: Any, folder: Path, prompt: dict[str, Any], n: int) -> int:
    """nodes.SaveImage.save_images, minus folder_paths: what ComfyUI's own PNG costs."""
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    size = 0
    for image in images:
        i = 255.0 * image  # ComfyUI: image.cpu().numpy(); here already numpy
        img = Image.fromarray(np.clip(i, 0, 255).astype(np.uint8))
        metadata = PngInfo()
        metadata.add_text("prompt", json.dumps(prompt))
        file = folder / f"ComfyUI_{n:05}_.png"
        img.save(file, pnginfo=metadata, compress_level=4)
        size += file.stat().st_size
    return size


def node_encode(images: Any, fmt: str, folder: Path, n: int) -> int:
    """SaveAndCallback.save's encoding and file write (executor/images.py)."""
    from comfy_courier.executor.images import encode, to_uint8_batch

    size = 0
    for pixels in to_uint8_batch(images):
        image = encode(pixels, fmt, QUALITY, None)
        path = folder / f"courier_{n:05}_.{image.extension}"
        with open(path, "wb") as handle:
            handle.write(image.data)
        size += len(image.data)
    return size


def in_process(images: Any, runs: int) -> dict[str, dict[str, float]]:
    prompt = workflow("model-free.json")
    times: dict[str, list[float]] = {"SaveImage png": [], **{f"node {f}": [] for f in FORMATS}}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for n in range(runs + 1):
            for name in times:
                t0 = time.perf_counter()
                if name == "SaveImage png":
                    size = save_image_like_comfyui(images, folder, prompt, n)
                else:
                    size = node_encode(images, name.split()[1], folder, n)
                dt = time.perf_counter() - t0
                if n:  # the first round warms caches and imports
                    times[name].append(dt)
                sizes[name] = size
    return {name: {"ms": p50(v) * 1000, "bytes": sizes[name]} for name, v in times.items()}


async def through_comfyui(url: str, image_name: str, runs: int) -> dict[str, dict[str, float]]:
    load = {"class_type": "LoadImage", "inputs": {"image": image_name}}
    client = RawClient(url)
    spans: dict[str, list[float]] = {"SaveImage png": [], **{f"node {f}": [] for f in FORMATS}}
    sizes: dict[str, int] = {}

    async def wait_history(prompt_id: str) -> dict[str, Any]:
        for _ in range(6000):
            hist = http_json(f"{url}/history/{prompt_id}")[1]
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                status = entry["status"]
                if status.get("status_str") == "success" or status.get("completed"):
                    return dict(entry)
                raise RuntimeError(f"prompt failed: {json.dumps(entry['status'])[:1500]}")
            await asyncio.sleep(0.02)
        raise RuntimeError("no history entry")

    for n in range(runs + 1):
        for name in spans:
            if name == "SaveImage png":
                wf = {
                    "1": load,
                    "2": {
                        "class_type": "SaveImage",
                        "inputs": {"images": ["1", 0], "filename_prefix": f"enc{n}"},
                    },
                }
                prompt_id = await submit_prompt(client, wf, "bench-enc")
            else:
                wf = {
                    "1": load,
                    "2": {
                        "class_type": "SaveAndCallback",
                        "inputs": {
                            "images": ["1", 0],
                            "filename_prefix": "enc",
                            "format": name.split()[1],
                            "quality": QUALITY,
                        },
                    },
                }
                prompt_id = await submit_job(client, wf, unique_id("enc"))
            entry = await wait_history(prompt_id)
            start, end = history_span(entry)
            if n and start is not None and end is not None:
                spans[name].append(end - start)
            await asyncio.sleep(0.05)
    await client.close()
    return {name: {"ms": p50(v), "bytes": sizes.get(name, 0)} for name, v in spans.items()}


def main() -> int:
    parser = BenchParser(__doc__)
    parser.add_argument("--image", type=Path, help="a picture to use instead of the synthetic one")
    parser.add_size("--runs", 3, 15)
    args = parser.parse()
    comfy = comfy_dir_of(args)
    runs = args.runs
    facts = print_header(
        f"encoding: {WIDTH}x{HEIGHT} in png / webp / jpeg (quality {QUALITY})",
        "node png time <= SaveImage png time; time and bytes per format",
        args,
    )
    use_repo_package()
    import numpy as np
    from PIL import Image, features

    pixels = load_image(args.image) if args.image else synthetic_image()
    source = str(args.image) if args.image else "synthetic (seed 7)"
    print(
        f"   image  : {source}; Pillow {Image.__version__}, libwebp {features.version('webp')}, "
        f"libjpeg-turbo {features.version('libjpeg_turbo') or 'no'}, "
        f"zlib {features.version('zlib')}"
    )
    images = pixels[None, ...].astype(np.float32)
    local = in_process(images, runs)
    ref = local["SaveImage png"]
    rows = [
        [
            name,
            f"{v['ms']:.1f} ms",
            f"{v['ms'] / ref['ms']:.2f}x",
            f"{v['bytes'] / 1e6:.3f} MB",
            f"{v['bytes'] / ref['bytes']:.2f}x",
            f"{v['bytes'] * 8 / 50e6 * 1000:.0f} ms",
        ]
        for name, v in local.items()
    ]
    print(f"   in-process, median of {runs}:")
    print(
        table(
            ["encoder", "time", "vs SaveImage", "bytes", "vs SaveImage", "transfer @50 Mbit/s"],
            rows,
        )
    )
    payload: dict[str, Any] = {"facts": facts, "image": source, "runs": runs, "in_process": local}
    node_png_ratio = local["node png"]["ms"] / ref["ms"]
    if comfy is not None:
        with TempDir(args.keep, "bench-encoding-") as tmp:
            input_dir = tmp / "input"
            input_dir.mkdir()
            Image.fromarray((pixels * 255).round().astype(np.uint8)).save(input_dir / "bench.png")
            server = start_server(tmp / "server", comfy, input_dir=input_dir)
            try:
                server.wait_up()
                real = asyncio.run(through_comfyui(server.url, "bench.png", runs))
            finally:
                server.stop()
        rref = real["SaveImage png"]["ms"]
        print(
            f"   through {facts['server']}, execution span (history timestamps), median of {runs}:"
        )
        print(
            table(
                ["output node", "span", "vs SaveImage"],
                [[name, f"{v['ms']:.0f} ms", f"{v['ms'] / rref:.2f}x"] for name, v in real.items()],
            )
        )
        payload["through_comfyui"] = real
        node_png_ratio = real["node png"]["ms"] / rref
    best = min(FORMATS, key=lambda f: local[f"node {f}"]["ms"])
    print(
        f"   fastest node format: {best}; smallest: "
        f"{min(FORMATS, key=lambda f: local[f'node {f}']['bytes'])}"
    )
    same = (
        "MEETS"
        if node_png_ratio <= 1.0
        else ("EQUAL within noise (<= 1.03x)" if node_png_ratio <= 1.03 else "MISSES")
    )
    print(
        f"RESULT encoding node-png/SaveImage time {node_png_ratio:.2f}x (target <= 1.00x)  {same}"
    )
    for f in FORMATS:
        v = local[f"node {f}"]
        print(
            f"RESULT encoding {f:5s} {v['ms']:7.1f} ms {v['bytes'] / 1e6:6.3f} MB "
            f"({v['ms'] / ref['ms']:.2f}x time, "
            f"{v['bytes'] / ref['bytes']:.2f}x bytes of SaveImage)"
        )
    payload["node_png_ratio"] = node_png_ratio
    write_json(args, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
