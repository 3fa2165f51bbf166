"""Does LTD pretraining pay on BCCD? The ablation, rerunnable and resumable.

Four configurations, each with several seeds, evaluated on BCCD's test split:
  scratch      detector from random init, T epochs
  ltd          LTD pretraining on BCCD's train images (labels unused), P epochs; then the detector, T epochs
  ltd-equal    LTD for p epochs, then the detector for T - p epochs: the same total budget as scratch
  ltd-masked   as `ltd`, but S's hole in R is greyed out (--mask-crop)

Budgets are in epochs, not minutes, so a busy CPU changes the wall clock but not the result; on the
README's machine an epoch of either kind at 320 px takes about 13 s, so T = 24 epochs is about 5 minutes.
Each finished run appends a row to the CSV (run again to resume); at the end a table of mean +- std
of the test metrics over seeds, and the wall time of the fastest seed.

    python benchmarks/ltd_ablation.py --data BCCD_Dataset           # all runs, then the table
    python benchmarks/ltd_ablation.py --table                              # the table from the CSV only
"""
import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

import odscratch as ods

CONFIGS = ["scratch", "ltd", "ltd-equal", "ltd-masked"]


def test_metrics(run_dir, data):
    model, cfg, classes = ods.load_detector(run_dir / "best.pt", torch.device("cpu"))
    test = ods.CheckedDataset(ods.load_split(data, "test"), cfg.img_size, train=False)
    network = ods.model_network(model, ods.use_bf16(torch.device("cpu"), False))
    predictions = ods.predict(network, test, cfg.batch, ods.EVAL_CONF, ods.NMS_IOU)
    return ods.evaluate(predictions, test.targets, len(classes))


def run(config, seed, args):
    row = {"config": config, "seed": seed, "pretrain_epochs": 0, "pretrain_s": 0, "ltd_iou": ""}
    backbone = None
    pretrain_epochs = {"scratch": 0, "ltd-equal": args.equal_pretrain_epochs}.get(config, args.pretrain_epochs)
    if pretrain_epochs:
        cfg = ods.RunConfig(data=args.data, img_size=args.img_size, epochs=pretrain_epochs, seed=seed, batch=ods.LTD_BATCH)
        start = time.time()
        run_dir, best = ods.pretrain_backbone(cfg, f"ablation-{config}-s{seed}", mask_crop=config == "ltd-masked")
        row.update(pretrain_epochs=pretrain_epochs, pretrain_s=round(time.time() - start),
                   ltd_iou=round(best["iou"], 4))
        backbone = run_dir / "backbone.pt"
    epochs = args.train_epochs - (pretrain_epochs if config == "ltd-equal" else 0)
    cfg = ods.RunConfig(data=args.data, img_size=args.img_size, epochs=epochs, seed=seed, assign_radius=0.5, batch=16)  # as measured
    start = time.time()
    run_dir, _, _ = ods.train_detector(cfg, f"ablation-{config}-s{seed}", backbone)
    row.update(train_epochs=epochs, train_s=round(time.time() - start))
    metrics = test_metrics(run_dir, args.data)
    row.update({k: round(metrics[k], 4) for k in ["map50", "map", "map75", "map90"]})
    return row


def read_rows(path):
    return list(csv.DictReader(open(path))) if path.exists() else []


def table(rows):
    lines = ["| configuration | LTD pretraining | LTD held-out IoU | detector training | test mAP50 | mAP50-95 | AP90 | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for config in CONFIGS:
        mine = [r for r in rows if r["config"] == config]
        if not mine:
            continue

        def stat(key):
            values = [float(r[key]) for r in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {spread:.3f}"

        minutes = lambda key: min(float(r[key]) for r in mine) / 60  # the fastest seed: others may have shared the CPU
        pretrained = config != "scratch"
        pretrain = f"{mine[0]['pretrain_epochs']} epochs, {minutes('pretrain_s'):.1f} min" if pretrained else "-"
        lines.append(f"| {config} | {pretrain} | {stat('ltd_iou') if pretrained else '-'} | "
                     f"{mine[0]['train_epochs']} epochs, {minutes('train_s'):.1f} min | "
                     f"{stat('map50')} | {stat('map')} | {stat('map90')} | {len(mine)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="BCCD_Dataset")
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-epochs", type=int, default=24, help="T")
    parser.add_argument("--pretrain-epochs", type=int, default=24, help="P")
    parser.add_argument("--equal-pretrain-epochs", type=int, default=8, help="p")
    parser.add_argument("--csv", type=Path, default=Path(__file__).with_name("ltd_ablation.csv"))
    parser.add_argument("--table", action="store_true", help="only print the table of the CSV")
    args = parser.parse_args()
    if not args.table:
        for seed in args.seeds:  # seed by seed: an interrupted ablation still has whole seeds
            for config in CONFIGS:
                if any(r["config"] == config and int(r["seed"]) == seed for r in read_rows(args.csv)):
                    continue
                ods.append_row(args.csv, run(config, seed, args))
    print(table(read_rows(args.csv)))
