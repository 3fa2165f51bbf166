"""Which changes make the boxes tighter? The tight-boxes ablation, rerunnable and resumable.

Each variant is the recipe with some Config fields set (IoU-aware class targets, edges as
distributions (DFL), the stride), trained on a dataset for a budget of
epochs (a busy CPU changes the wall clock, not the result) or of minutes (--minutes: what a user
gets from a CPU), scored on its test split: mAP50, AP75, AP90, mAP50-95 and milliseconds per image
(batch 1, the median of LATENCY_IMAGES images). Each finished run appends a row to the CSV; run the
same command again to go on with what is missing. --table prints the medians over seeds.

    python benchmarks/tight_boxes.py --data shapes --seeds 0           # the default run's budget
    python benchmarks/tight_boxes.py --data bccd=../shared/data/bccd --epochs 40 --seeds 0 1 2
    python benchmarks/tight_boxes.py --table
"""
import argparse
import csv
import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import odscratch as ods

BEFORE = {"iou_targets": False, "dfl_bins": 0}  # the recipe before this ablation
VARIANTS = {  # name -> RunConfig fields; the rest are the defaults
    "before: one-hot classes, (cx, cy, w, h)": BEFORE,
    "IoU targets": {**BEFORE, "iou_targets": True},
    "stride 8": {**BEFORE, "stride": 8},
    "DFL (17 bins)": {**BEFORE, "dfl_bins": 17},  # the default since
    "IoU targets + DFL": {"iou_targets": True, "dfl_bins": 17},
    "DFL + stride 8": {**BEFORE, "dfl_bins": 17, "stride": 8},
}
DATA = {  # a short name -> the settings every variant trains it with (data= comes from --data)
    "shapes": {},  # the built-in shapes at the default run's settings
    "bccd": {"img_size": 320},
    "raccoon": {"img_size": 320},   # few large objects (benchmarks/public_sets.py writes it)
    "cherries": {"img_size": 320},  # many small ones (the same)
}
METRICS = ["map50", "map75", "map90", "map"]
LATENCY_IMAGES = 30


def cpu_kind():
    """The CPU's model name and family, and its widest instructions torch can use."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines()
                              if line.startswith(key)), "")
    isa = "AVX-512 bf16" if "avx512_bf16" in info else "AVX-512" if "avx512f" in info else "AVX2"
    return f"{field('model name') or platform.machine()} (family {field('cpu family')}), {isa}"


@torch.no_grad()
def test_scores(run_dir, data):
    """The best.pt's test-split metrics and its milliseconds per image at batch 1."""
    device = torch.device("cpu")
    model, cfg, classes = ods.load_detector(run_dir / "best.pt", device)
    test = ods.CheckedDataset(ods.load_split(data, "test"), cfg.img_size, train=False)
    network = ods.model_network(model, ods.use_bf16(device, cfg.fp32))
    found = ods.predict(network, test, cfg.batch, ods.EVAL_CONF, ods.NMS_IOU)
    metrics = ods.evaluate(found, test.targets, len(classes))
    times = []
    for i in range(min(LATENCY_IMAGES, len(test))):
        images, _ = ods.collate([test[i]])
        start = time.perf_counter()
        ods.select_detections(*network(images), test.sizes[i:i + 1], ods.DETECT_CONF, ods.NMS_IOU)
        times.append(time.perf_counter() - start)
    return metrics, 1000 * statistics.median(times[1:])  # the first call warms up


def run(name, data, variant, seed, args):
    budget = ({"time": args.minutes} if args.minutes else {"epochs": args.epochs} if args.epochs
              else {})
    cfg = ods.RunConfig(data=data, seed=seed, fp32=args.fp32,
                        **{**DATA[name], **budget, **VARIANTS[variant]})
    start = time.time()
    slug = "".join(c if c.isalnum() else "-" for c in variant.lower())
    run_dir, _, _ = ods.train_detector(cfg, f"tight-{name}-{slug}-s{seed}")
    train_s = round(time.time() - start)
    metrics, ms = test_scores(run_dir, data)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    return {"data": name, "variant": variant, "seed": seed, "budget": budget_name(args),
            "precision": precision_name(args), "train_s": train_s,
            **{k: round(metrics[k], 4) for k in METRICS},
            "ms_per_image": round(ms, 2), "commit": commit, "cpu": cpu_kind(),
            "date": datetime.date.today().isoformat()}


def budget_name(args):
    return (f"{args.minutes:g} min" if args.minutes else f"{args.epochs} epochs" if args.epochs
            else "default epochs")


def precision_name(args):
    return "bf16" if ods.use_bf16(torch.device("cpu"), args.fp32) else "float32"


def read_rows(path):
    return list(csv.DictReader(open(path))) if path.exists() else []


def print_table(rows):
    print("| data | budget | variant | seeds | train min | mAP50 | AP75 | AP90 | mAP50-95 | "
          "ms/image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    groups = dict.fromkeys((r["data"], r["budget"], r["precision"], r["variant"]) for r in rows)
    for data, budget, precision, variant in groups:
        runs = [r for r in rows if (r["data"], r["budget"], r["precision"], r["variant"])
                == (data, budget, precision, variant)]
        median = lambda key: statistics.median(float(r[key]) for r in runs)
        print(f"| {data} | {budget}, {precision} | {variant} | {len(runs)} | "
              f"{median('train_s') / 60:.1f} | "
              + " | ".join(f"{median(k):.3f}" for k in METRICS)
              + f" | {median('ms_per_image'):.1f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="shapes",
                        help="shapes, or bccd=PATH: a short name from DATA and where its data is")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=0, help="default: the default run's")
    parser.add_argument("--minutes", type=float, default=0.0, help="a time budget instead")
    parser.add_argument("--fp32", action="store_true")
    parser.add_argument("--csv", type=Path, default=Path("benchmarks/tight_boxes.csv"))
    parser.add_argument("--table", action="store_true", help="only print the table from the CSV")
    args = parser.parse_args()
    if not args.table:
        name, _, data = args.data.partition("=")
        data = data or "synthetic"
        precision = precision_name(args)
        done = {(r["data"], r["variant"], r["seed"], r["budget"], r["precision"])
                for r in read_rows(args.csv)}
        for seed in args.seeds:
            for variant in args.variants:
                if (name, variant, str(seed), budget_name(args), precision) not in done:
                    ods.append_row(args.csv, run(name, data, variant, seed, args))
    print_table(read_rows(args.csv))


if __name__ == "__main__":
    main()
