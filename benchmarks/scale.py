"""From 300 images to 20,000: what a large dataset costs before and during training.

On a generated YOLO dataset (--images 640 x 480 JPEGs of the built-in shapes, 1-5 boxes each,
5 % of them the validation split; written to --folder the first time, not committed):

  1. start-up, first run: a fresh process reads the layout (datasets converts it), checks and
     decodes every image once and keeps it resized on disk (prepare_split), for train and
     validation: everything `odscratch train` does before its first step. Its own datasets cache,
     so nothing is left from before;
  2. start-up, second run (or --resume, or another rank): the same, with that cache;
  3. peak memory (resident set) of each of those processes;
  4. the loader alone: images per second through the DataLoader `fit` uses (decode-free: the
     prepared images, augmented, collated) with 0, 1 and 2 workers;
  5. training throughput: the training step (loader with --workers' default, forward, loss with
     cell assignment, backward, clip, AdamW) against the bare network (forward + backward + AdamW
     on random images) at the same size, batch and precision; median of --steps steps each.

    python benchmarks/scale.py                      # 20,000 images at 320 px
"""
import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.ImageDraw
import torch
import torch.nn as nn
import yaml

import odscratch as ods

WIDTH, HEIGHT = 640, 480

START_UP = """
import resource, sys, time
start = time.perf_counter()
import odscratch as ods
data, img_size = sys.argv[1], int(sys.argv[2])
train = ods.CheckedDataset(ods.load_split(data, "train"), img_size, train=True)
val = ods.CheckedDataset(ods.load_split(data, "validation"), img_size, train=False)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      len(train), len(val))
"""


def write_image(job):
    """Image i of the dataset, with its YOLO label file."""
    folder, split, i = job
    rng = np.random.default_rng(i)
    image = ods.synthetic_background(rng).resize((WIDTH, HEIGHT))
    draw, lines = PIL.ImageDraw.Draw(image), []
    for _ in range(rng.integers(1, 6)):
        w, h = rng.uniform(30, 200, 2)
        x0, y0 = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
        label = int(rng.integers(len(ods.SYNTHETIC_CLASSES)))
        colour = tuple(rng.integers(0, 256, 3).tolist())
        if ods.SYNTHETIC_CLASSES[label] == "triangle":
            draw.polygon([(x0 + w / 2, y0), (x0 + w, y0 + h), (x0, y0 + h)], fill=colour)
        else:
            getattr(draw, ods.SYNTHETIC_CLASSES[label])([x0, y0, x0 + w, y0 + h], fill=colour)
        lines.append(f"{label} {(x0 + w / 2) / WIDTH:.6f} {(y0 + h / 2) / HEIGHT:.6f} "
                     f"{w / WIDTH:.6f} {h / HEIGHT:.6f}")
    image.save(folder / "images" / split / f"{i:06d}.jpg", quality=90)
    (folder / "labels" / split / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")


def generate(folder, images):
    if (folder / "data.yaml").exists():
        return
    val = images // 20
    jobs = [(folder, "val" if i < val else "train", i) for i in range(images)]
    for kind in ("images", "labels"):
        for split in ("train", "val"):
            (folder / kind / split).mkdir(parents=True, exist_ok=True)
    with multiprocessing.Pool() as pool:
        pool.map(write_image, jobs, chunksize=64)
    (folder / "data.yaml").write_text(yaml.safe_dump({
        "path": str(folder), "train": "images/train", "val": "images/val",
        "names": dict(enumerate(ods.SYNTHETIC_CLASSES))}))


def start_up(folder, img_size, cache):
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", START_UP, str(folder), str(img_size)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    seconds, gib, train, val = out[-4:]
    return float(seconds), float(gib), int(train), int(val)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "odscratch-20k"))
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=ods.Config.batch)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--loader-batches", type=int, default=300)
    args = parser.parse_args()
    folder = Path(args.folder)
    start = time.perf_counter()
    generate(folder, args.images)
    print(f"{ods.cpu_kind()}, {ods.cpu_cores()} cores, {torch.get_num_threads()} threads; "
          f"{args.images} images of {WIDTH} x {HEIGHT} at {args.img_size} px, batch {args.batch} "
          f"(dataset ready in {time.perf_counter() - start:.0f} s)")
    with tempfile.TemporaryDirectory() as cache:
        first = start_up(folder, args.img_size, cache)
        second = start_up(folder, args.img_size, cache)
        print(f"start-up, first run: {first[0]:.1f} s, peak memory {first[1]:.2f} GiB "
              f"({first[2]} train + {first[3]} validation images)")
        print(f"start-up, second run: {second[0]:.1f} s, peak memory {second[1]:.2f} GiB")
        os.environ["HF_DATASETS_CACHE"] = cache
        ods.PREPARED = Path(cache) / "odscratch"
        data = ods.CheckedDataset(ods.load_split(str(folder), "train"), args.img_size,
                                    train=True)
        cfg = ods.RunConfig(data=str(folder), img_size=args.img_size, batch=args.batch)
        batches = list(ods.seeded_batches(data, cfg))
        for workers in (0, 1, 2):
            loader = torch.utils.data.DataLoader(data, batch_sampler=batches[:args.loader_batches],
                                                 num_workers=workers, collate_fn=ods.collate)
            start = time.perf_counter()
            count = sum(len(targets) for _, targets in loader)
            print(f"loader alone, {workers} workers: {count / (time.perf_counter() - start):.0f} "
                  "images/s")

        device = torch.device("cpu")
        bf16 = ods.use_bf16(device, cfg.fp32)
        model = ods.GridDetector(len(ods.SYNTHETIC_CLASSES), cfg.stride, cfg.assign_radius)
        model = model.to(memory_format=ods.MEMORY_FORMAT).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        loader = torch.utils.data.DataLoader(data, batch_sampler=batches,
                                             num_workers=ods.default_workers(device),
                                             collate_fn=ods.collate)
        times, start = [], time.perf_counter()
        for step, (images, targets) in enumerate(loader):
            parts, _ = ods.detection_loss(*ods.run_model(model, images, bf16), targets,
                                          cfg.img_size, cfg.assign_radius)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            nn.utils.clip_grad_norm_(model.parameters(), ods.GRAD_CLIP)
            optimizer.step()
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            if step == 5 + args.steps:
                break
        bare_times, images = [], torch.rand(args.batch, 3, args.img_size, args.img_size)
        for step in range(5 + args.steps):
            start = time.perf_counter()
            boxes, logits = ods.run_model(model, images, bf16)
            (boxes.mean() + logits.mean()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bare_times.append(time.perf_counter() - start)
        step_s, bare_s = statistics.median(times[5:]), statistics.median(bare_times[5:])
        print(f"training: {args.batch / step_s:.1f} images/s ({'bf16' if bf16 else 'float32'}, "
              f"{ods.default_workers(device)} workers); bare network {args.batch / bare_s:.1f} "
              f"images/s; ratio {bare_s / step_s:.2f}")


if __name__ == "__main__":
    main()
