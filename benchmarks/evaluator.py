"""The evaluator at COCO's scale: odscratch's `evaluate` on 5,000 images x 100 detections x 80
classes (COCO val2017's size), timed on one core, beside pycocotools on the same input.

Each image is 640 x 480 with a few true boxes (Poisson, mean 7) of random classes; its 100
detections are jittered copies of them (some of another class) and random boxes of random
classes, scores uniform. Time: median of --rounds calls; pycocotools (evaluate + accumulate) once,
with its mAP beside ours.

    pip install pycocotools
    python benchmarks/evaluator.py
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import odscratch as ods

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_odscratch import pycocotools_metrics  # noqa: E402


def coco_sized_case(rng, images, detections, classes):
    predictions, targets = [], []
    for _ in range(images):
        n = max(1, rng.poisson(7))
        xy = rng.uniform(0, [600, 440], (n, 2))
        true = np.concatenate([xy, xy + rng.uniform(8, 200, (n, 2))], 1)
        true_labels = rng.integers(0, classes, n)
        copies = np.repeat(true, 3, 0) + rng.normal(0, 6, (3 * n, 4))
        copy_labels = np.where(rng.random(3 * n) < 0.8, np.repeat(true_labels, 3),
                               rng.integers(0, classes, 3 * n))
        extra_xy = rng.uniform(0, [600, 440], (detections - 3 * n, 2))
        extra = np.concatenate([extra_xy, extra_xy + rng.uniform(8, 200, extra_xy.shape)], 1)
        boxes = np.concatenate([copies, extra])[:detections]
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        labels = np.concatenate([copy_labels, rng.integers(0, classes, len(extra))])[:detections]
        predictions.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                            "scores": torch.tensor(rng.random(detections), dtype=torch.float32),
                            "labels": torch.tensor(labels)})
        targets.append({"boxes": torch.tensor(true, dtype=torch.float32),
                        "labels": torch.tensor(true_labels)})
    return predictions, targets


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    predictions, targets = coco_sized_case(np.random.default_rng(0), args.images,
                                           args.detections, args.classes)
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        ours = ods.evaluate(predictions, targets, args.classes)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    theirs = pycocotools_metrics(predictions, targets, args.classes)  # the tests' reference
    theirs_s = time.perf_counter() - start
    print(f"{ods.cpu_kind()}, one thread; {args.images} images x {args.detections} detections x "
          f"{args.classes} classes")
    print("| evaluator | time | mAP50-95 | mAP50 |\n|---|---|---|---|")
    print(f"| odscratch `evaluate` | {statistics.median(times):.2f} s ({min(times):.2f}-"
          f"{max(times):.2f}, median of {args.rounds}) | {ours['map']:.6f} | "
          f"{ours['map50']:.6f} |")
    print(f"| pycocotools evaluate + accumulate | {theirs_s:.2f} s (once) | {theirs['map']:.6f} | "
          f"{theirs['map50']:.6f} |")


if __name__ == "__main__":
    main()
