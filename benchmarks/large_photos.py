"""Large photos: a built-in model on generated photos many times its input size, with and without
tiles (`detect --tile`, `detector(image, tile=True)`), scored and timed.

Each photo is --side x --side pixels of the built-in background with --objects built-in shapes
(ellipse, rectangle, triangle), each the size the model saw them in training (a side of 10-50 %
of the 320 px built-in image, so 16-80 px for a model trained at 160 px), so each is 1-4 % of the
photo's side; one shape per cell of a grid, so none hides another. Per photo, in one run:
mAP50 and mAP50-95 with odscratch's evaluator (the detections at confidence 0.001, as `eval`
scores), then the time from the decoded photo to the boxes at the model's own confidence,
median of --rounds calls.

    odscratch train                                   # the built-in model, runs/train/exp
    python benchmarks/large_photos.py --weights runs/train/exp/best.pt
"""
import argparse
import math
import statistics
import time

import numpy as np
import PIL.ImageDraw
import torch

import odscratch as ods


def large_photo(rng, side, count, img_size):
    """A side x side photo with count shapes at the model's scale -> image, {boxes, labels}."""
    image = ods.synthetic_background(rng).resize((side, side))
    draw, boxes, labels = PIL.ImageDraw.Draw(image), [], []
    cells = math.ceil(math.sqrt(count))
    cell = side / cells
    low, high = (img_size * fraction for fraction in ods.SYNTHETIC_OBJECT_SIDE)
    for i in rng.permutation(cells * cells)[:count]:
        w, h = np.exp(rng.uniform(math.log(low), math.log(high), 2))
        x0 = (i % cells) * cell + rng.uniform(0, cell - w)
        y0 = (i // cells) * cell + rng.uniform(0, cell - h)
        box, label = [x0, y0, x0 + w, y0 + h], int(rng.integers(len(ods.SYNTHETIC_CLASSES)))
        colour = tuple(rng.integers(0, 256, 3).tolist())
        if ods.SYNTHETIC_CLASSES[label] == "triangle":
            draw.polygon([((x0 + box[2]) / 2, y0), tuple(box[2:]), (x0, box[3])], fill=colour)
        else:
            getattr(draw, ods.SYNTHETIC_CLASSES[label])(box, fill=colour)
        boxes.append(box)
        labels.append(label)
    return image, {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True, help="a best.pt trained on the built-in data")
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--side", type=int, default=2000)
    parser.add_argument("--objects", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    detector = ods.Detector.load(args.weights, "cpu")
    rng = np.random.default_rng(0)
    photos = [large_photo(rng, args.side, args.objects, detector.img_size)
              for _ in range(args.photos)]
    tiles = len(ods.tile_corners(args.side, args.side, detector.img_size))
    print(f"{ods.cpu_kind()}, {args.threads} threads; {args.photos} photos of {args.side} px, "
          f"{args.objects} shapes each, a {detector.img_size} px model ({tiles} tiles a photo)")
    print("| pass | mAP50 | mAP50-95 | time per photo |\n|---|---|---|---|")
    for tile in (False, True):
        found = [detector(image, conf=ods.EVAL_CONF, tile=tile)[0] for image, _ in photos]
        metrics = ods.evaluate(found, [target for _, target in photos], len(detector.classes))
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for image, _ in photos:
                detector(image, tile=tile)
            times.append((time.perf_counter() - start) / len(photos))
        print(f"| {'tiles + whole photo' if tile else 'whole photo'} | {metrics['map50']:.3f} | "
              f"{metrics['map']:.3f} | {statistics.median(times):.2f} s "
              f"({min(times):.2f}-{max(times):.2f}) |")


if __name__ == "__main__":
    main()
