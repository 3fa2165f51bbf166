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
import contextlib
import io
import statistics
import time

import numpy as np
import torch

import odscratch as ods


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


def pycocotools_map(predictions, targets, classes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    gt = {"images": [{"id": i + 1} for i in range(len(targets))],
          "categories": [{"id": k + 1} for k in range(classes)], "annotations": []}
    for i, t in enumerate(targets):
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            w = xywh(box)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1,
                                      "category_id": label + 1, "bbox": w, "area": w[2] * w[3],
                                      "iscrowd": 0})
    dets = [{"image_id": i + 1, "category_id": label + 1, "bbox": xywh(box), "score": score}
            for i, p in enumerate(predictions) for box, label, score in
            zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        result = COCOeval(coco, coco.loadRes(dets), "bbox")
        result.evaluate()
        result.accumulate()
    precision = result.eval["precision"][:, :, :, 0, -1]
    return float(precision[precision > -1].mean()), float(precision[0][precision[0] > -1].mean())


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
    theirs = pycocotools_map(predictions, targets, args.classes)
    theirs_s = time.perf_counter() - start
    print(f"{ods.cpu_kind()}, one thread; {args.images} images x {args.detections} detections x "
          f"{args.classes} classes")
    print("| evaluator | time | mAP50-95 | mAP50 |\n|---|---|---|---|")
    print(f"| odscratch `evaluate` | {statistics.median(times):.2f} s ({min(times):.2f}-"
          f"{max(times):.2f}, median of {args.rounds}) | {ours['map']:.6f} | "
          f"{ours['map50']:.6f} |")
    print(f"| pycocotools evaluate + accumulate | {theirs_s:.2f} s (once) | {theirs[0]:.6f} | "
          f"{theirs[1]:.6f} |")


if __name__ == "__main__":
    main()
