"""Which changes to the training recipe pay on BCCD? The lever ablation, rerunnable and resumable.

Each lever is the recipe of its commit with one thing changed (a Config field or a module constant),
trained for --epochs on BCCD's train split and scored on its test split. Budgets are in epochs, so a
busy CPU changes the wall clock but not the result. Each finished run appends a row to the CSV (run
again to resume); --table prints mean +- std over seeds from the CSV.

    python benchmarks/levers.py --data BCCD_Dataset --levers baseline "radius 1" --seeds 0
    python benchmarks/levers.py --table
"""
import argparse
import csv
import math
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

import odscratch as ods

BASE = {"img_size": 320, "assign_radius": 0.5, "batch": 16}  # the recipe the levers were measured on
R1B8 = {"assign_radius": 1.0, "batch": 8}


def cells_to_boxes_exp_wh(raw, h, w, radius):
    """The module's cells_to_boxes with YOLOv2's size parameterisation: width exp(t) cells (from one cell
    at t = 0), instead of sigmoid(t) of the image (from half the image at t = 0)."""
    boxes = CELLS_TO_BOXES(raw, h, w, radius)
    cells = raw[..., 2:4].clamp(-8, math.log(max(h, w))).exp()
    return torch.stack([boxes[..., 0], boxes[..., 1], cells[..., 0] / w, cells[..., 1] / h], -1)


CELLS_TO_BOXES = ods.cells_to_boxes


def weighted_loss(weights):
    """The module's detection_loss with its parts (cls, SmoothL1 box, GIoU) summed with other weights."""
    def detection_loss(*args):
        parts, collisions = DETECTION_LOSS(*args)
        return {**parts, "loss": sum(w * parts[k] for k, w in weights.items())}, collisions
    return detection_loss


DETECTION_LOSS = ods.detection_loss
LEVERS = {  # name -> (Config fields, module constants), each against the recipe of the commit it ran on
    "baseline": ({}, {}),
    "radius 1 (cells inside the box)": ({"assign_radius": 1.0}, {}),
    "radius 1.5 (cells inside the box)": ({"assign_radius": 1.5}, {}),
    "stride 8": ({"stride": 8}, {}),
    "384 px": ({"img_size": 384}, {}),
    "batch 8": ({"batch": 8}, {}),
    "weight decay 0.05": ({"weight_decay": 0.05}, {}),
    "radius 1 (inside the box) + batch 8": (R1B8, {}),
    "radius 1 + batch 8 + GIoU only (no SmoothL1)": (R1B8, {"detection_loss": weighted_loss({"cls": 1, "box": 0, "giou": 1})}),
    "radius 1 + batch 8 + SmoothL1 only (no GIoU)": (R1B8, {"detection_loss": weighted_loss({"cls": 1, "box": 1, "giou": 0})}),
    "radius 1 + batch 8 + box losses x 3": (R1B8, {"detection_loss": weighted_loss({"cls": 1, "box": 3, "giou": 3})}),
    "radius 1 + batch 8 + w, h = exp(t) cells": (R1B8, {"cells_to_boxes": cells_to_boxes_exp_wh}),
    "radius 1 + batch 8 + scale jitter 0.5-1.5": (R1B8, {"AUGMENT": v2.Compose([
        v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.5, 1.5)),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3), v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=2)])}),
}
METRICS = ["map50", "map", "map75", "map90"]


def test_metrics(run_dir, data):
    model, cfg, classes = ods.load_detector(run_dir / "best.pt", torch.device("cpu"))
    test = ods.CheckedDataset(ods.load_split(data, "test"), cfg.img_size, train=False)
    bf16 = ods.use_bf16(torch.device("cpu"), False)
    found = ods.predict(ods.model_network(model, bf16), test, cfg.batch, ods.EVAL_CONF, ods.NMS_IOU)
    return ods.evaluate(found, test.targets, len(classes))


def run(lever, seed, args):
    fields, constants = LEVERS[lever]
    saved = {name: getattr(ods, name) for name in constants}
    for name, value in constants.items():
        setattr(ods, name, value)
    try:
        cfg = ods.RunConfig(data=args.data, epochs=args.epochs, seed=seed, **{**BASE, **fields})
        start = time.time()
        run_dir, _, _ = ods.train_detector(cfg, f"lever-{lever.replace(' ', '-')}-s{seed}")
        train_s = round(time.time() - start)
        metrics = test_metrics(run_dir, args.data)
    finally:
        for name, value in saved.items():
            setattr(ods, name, value)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    return {"lever": lever, "seed": seed, "epochs": args.epochs, "train_s": train_s, "commit": commit,
            **{k: round(metrics[k], 4) for k in METRICS}}


def read_rows(path):
    return list(csv.DictReader(open(path))) if path.exists() else []


def mean_std(values):
    values = [float(v) for v in values]
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def print_table(rows):
    print("| lever | epochs | train min | test mAP50 | mAP50-95 | AP75 | AP90 | seeds |")
    print("|---|---|---|---|---|---|---|---|")
    for lever in dict.fromkeys(r["lever"] for r in rows):
        runs = [r for r in rows if r["lever"] == lever]
        minutes = min(float(r["train_s"]) for r in runs) / 60
        print(f"| {lever} | {runs[0]['epochs']} | {minutes:.1f} | "
              + " | ".join(mean_std(r[k] for r in runs) for k in METRICS) + f" | {len(runs)} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="BCCD_Dataset")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--csv", type=Path, default=Path("benchmarks/levers.csv"))
    parser.add_argument("--table", action="store_true", help="only print the table from the CSV")
    args = parser.parse_args()
    if not args.table:
        done = {(r["lever"], r["seed"]) for r in read_rows(args.csv)}
        for lever in args.levers:
            for seed in args.seeds:
                if (lever, str(seed)) not in done:
                    ods.append_row(args.csv, run(lever, seed, args))
    print_table(read_rows(args.csv))


if __name__ == "__main__":
    main()
