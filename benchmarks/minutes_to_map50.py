"""Minutes of training until validation mAP50 first reaches a target, per run and the median.

    for seed in 0 1 2; do odscratch train --seed $seed --name synth-s$seed; done
    python benchmarks/minutes_to_map50.py runs/train/synth-s*/results.csv [--target 0.9]

Reads results.csv (one row per epoch, `elapsed_s` counts training and validation since the start of
training, not the one-off data generation before it). Not part of CI.
"""

import argparse
import csv
import statistics


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("--target", type=float, default=0.9)
    args = parser.parse_args()
    minutes = []
    for path in args.results:
        rows = list(csv.DictReader(open(path)))
        hit = next((r for r in rows if float(r["map50"]) >= args.target), None)
        last = rows[-1]
        print(f"{path}: " + (f"mAP50 {float(hit['map50']):.3f} at epoch {hit['epoch']}, {float(hit['elapsed_s']) / 60:.1f} min"
                             if hit else f"never reached {args.target}")
              + f"; final epoch {last['epoch']}: mAP50 {float(last['map50']):.3f}, mAP50-95 {float(last['map']):.3f},"
              f" {float(last['elapsed_s']) / 60:.1f} min")
        minutes.append(float(hit["elapsed_s"]) / 60 if hit else float("inf"))
    print(f"median minutes to mAP50 >= {args.target}: {statistics.median(minutes):.1f} over {len(minutes)} runs")


if __name__ == "__main__":
    main()
