"""odscratch against Ultralytics YOLO11n, side by side: same data, time budget, threads and evaluator.

For each seed, in one run on one machine:
  1. BCCD (or any dataset odscratch loads) is written out in YOLO's format, once, from odscratch's own
     splits, so both train, validate and test on identical images and boxes;
  2. YOLO11n is trained from scratch (`yolo11n.yaml`, nothing downloaded) for --minutes, batch 16,
     its default AdamW + mosaic recipe;
  3. odscratch is trained with `odscratch train --time MINUTES` and its defaults;
  4. both predict the test split (confidence 0.001, at most 100 boxes per image, each tool's own NMS)
     and both are scored by odscratch's `evaluate` (tested equal to pycocotools) on the same boxes.
Then one table: the median over seeds of each metric, with the ratio odscratch / YOLO11n; and the
single-image latency of both (model + NMS on one 3 x S x S image, the seed-0 weights), each in its
own default precision and in the other's, timed in interleaved rounds.

Each finished training appends a row to the CSV: run again to resume; --table prints from the CSV.
Both trainings run in subprocesses with the same number of torch threads (--threads).

    pip install -e ".[compare]"
    python benchmarks/yolo_vs_odscratch.py --data BCCD_Dataset --seeds 0 1 2   # ~95 min, then the table
    python benchmarks/yolo_vs_odscratch.py --table
    python benchmarks/yolo_vs_odscratch.py --data BCCD_Dataset --fp32   # odscratch in float32 throughout
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import odscratch as ods

BENCH = Path("runs/bench")
METRICS = ["map50", "map", "map75", "map90"]
YOLO_BATCH = 16
TOOLS = ["yolo11n", "odscratch"]


def export_yolo_format(data, root):
    """odscratch's train/validation/test splits -> images/<split>/*.jpg + labels/<split>/*.txt + data.yaml."""
    classes = None
    for split in ["train", "validation", "test"]:
        ds = ods.load_split(data, split)
        classes = classes or ods.class_names(ds)
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(ds.cast_column("image", ods.datasets.Image(decode=False))):
            image = ods.open_image(row["image"]).convert("RGB")
            width, height = image.size
            image.save(root / "images" / split / f"{i:05d}.jpg", quality=95)
            boxes, cats = ods.objects_columns(row["objects"])
            boxes, keep, _ = ods.clip_and_drop(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), width, height)
            cxcywh = ods.box_convert(boxes, "xyxy", "cxcywh") / torch.tensor([width, height, width, height])
            lines = [f"{c} " + " ".join(f"{v:.6f}" for v in box) for c, box in
                     zip([c for c, k in zip(cats, keep.tolist()) if k], cxcywh.tolist())]
            (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(lines))
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(classes))
    (root / "data.yaml").write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/validation\n"
                                    f"test: images/test\nnames:\n{names}\n")
    return classes


def train_yolo(root, args, seed):
    name = f"yolo-{args.minutes:g}min-s{seed}"
    code = (f"from ultralytics import YOLO; YOLO('yolo11n.yaml').train(data={str(root / 'data.yaml')!r}, "
            f"time={args.minutes / 60}, epochs=1000, imgsz={args.img_size}, batch={YOLO_BATCH}, device='cpu', "
            f"seed={seed}, plots=False, project={str(BENCH.resolve())!r}, name={name!r}, exist_ok=True)")
    subprocess.run([sys.executable, "-c", f"import torch; torch.set_num_threads({args.threads}); {code}"],
                   check=True, env=threads_env(args))
    return BENCH / name / "weights" / "best.pt"


def train_odscratch(args, seed):
    name = f"odscratch-{args.minutes:g}min-s{seed}"
    subprocess.run([str(Path(sys.executable).parent / "odscratch"), "train", "--data", args.data, "--img-size", str(args.img_size),
                    "--time", str(args.minutes), "--seed", str(seed), "--name", name, *args.odscratch_args.split(),
                    *(["--fp32"] if args.fp32 else [])],
                   check=True, env=threads_env(args))
    return sorted(Path("runs/train").glob(f"{name}*"), key=os.path.getmtime)[-1] / "best.pt"


def threads_env(args):
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "YOLO_OFFLINE": "1"}


def yolo_predictions(weights, test, args):
    from ultralytics import YOLO
    model, results = YOLO(weights), []
    for i in range(len(test)):
        image = ods.open_image(test.ds[i]["image"]).convert("RGB")
        r = model.predict(image, imgsz=args.img_size, conf=ods.EVAL_CONF, iou=0.7, max_det=ods.MAX_DETECTIONS,
                          device="cpu", verbose=False)[0].boxes
        results.append({"boxes": r.xyxy.cpu(), "scores": r.conf.cpu(), "labels": r.cls.long().cpu()})
    return results


def odscratch_predictions(weights, test, args):
    model, cfg, classes = ods.load_detector(weights, torch.device("cpu"))
    bf16 = ods.use_bf16(torch.device("cpu"), args.fp32)
    return ods.predict(ods.model_network(model, bf16), test, cfg.batch, ods.EVAL_CONF, ods.NMS_IOU)


def yolo_forward(weights, bf16):
    """YOLO's detection model as its predictor runs it on a CPU (BatchNorm fused, float32), + its NMS."""
    from ultralytics import YOLO
    from ultralytics.utils.nms import non_max_suppression
    memory = ods.MEMORY_FORMAT
    model = YOLO(weights).model.float().fuse().eval().to(memory_format=memory)

    @torch.inference_mode()
    def forward(image):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(image.to(memory_format=memory))[0]
        return non_max_suppression(out.float(), ods.DETECT_CONF, ods.NMS_IOU, max_det=ods.MAX_DETECTIONS)
    return forward


def odscratch_forward(weights, bf16, fold=True):
    """odscratch's model as `odscratch detect` runs it (load_detector), + select_detections."""
    model, cfg, classes = ods.load_detector(weights, torch.device("cpu"))
    if not fold:  # the same weights, BatchNorm left as it was trained
        model = ods.GridDetector(len(classes), cfg.stride, cfg.assign_radius, cfg.dfl_bins).eval()
        model.load_state_dict(torch.load(weights, weights_only=True)["model"])
    memory = ods.MEMORY_FORMAT
    model = model.to(memory_format=memory)

    @torch.inference_mode()
    def forward(image):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            boxes, logits, _ = model(image.to(memory_format=memory))
        found = ods.score_cells(boxes, logits)
        return ods.select_detections(*found, [image.shape[2:]], ods.DETECT_CONF, ods.NMS_IOU)
    return forward


def latencies(forwards, size, rounds, runs):
    """Median single-image latency (ms) of each forward, timed in interleaved rounds so that a busy
    moment of a shared CPU slows every model alike."""
    image = torch.rand(1, 3, size, size)
    times = {name: [] for name in forwards}
    for forward in forwards.values():
        for _ in range(10):  # warm-up: oneDNN picks its kernels on the first calls
            forward(image)
    for _ in range(rounds):
        for name, forward in forwards.items():
            for _ in range(runs):
                start = time.perf_counter()
                forward(image)
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def latency_table(rows, args):
    weights = {tool: next(r["weights"] for r in rows if r["tool"] == tool) for tool in TOOLS}
    bf16 = ods.use_bf16(torch.device("cpu"), args.fp32)
    forwards = {"yolo11n, float32 (its CPU default)": yolo_forward(weights["yolo11n"], False),
                "odscratch, float32 (--fp32)": odscratch_forward(weights["odscratch"], False)}
    if bf16:
        forwards["yolo11n, bf16 + channels_last (not its default)"] = yolo_forward(weights["yolo11n"], True)
        forwards["odscratch, bf16 + channels_last, BatchNorm not folded"] = odscratch_forward(weights["odscratch"], True,
                                                                                              fold=False)
        forwards["odscratch, bf16 + channels_last (its default here)"] = odscratch_forward(weights["odscratch"], True)
    torch.set_num_threads(args.threads)
    ms = latencies(forwards, args.img_size, args.rounds, args.runs)
    shipped = ms[list(forwards)[-1]] / ms[list(forwards)[0]]
    print(f"\nsingle {args.img_size} x {args.img_size} image, model + NMS, {args.threads} threads, "
          f"median of {args.rounds} x {args.runs} interleaved runs")
    print("| model | latency |\n|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} ms |")
    print(f"| ratio, each tool's default: odscratch / yolo11n | {shipped:.2f} |")


def run_tool(tool, seed, root, args):
    """Train one tool for one seed, then score it on the test split and time it -> a CSV row."""
    start = time.time()
    weights = train_yolo(root, args, seed) if tool == "yolo11n" else train_odscratch(args, seed)
    train_s = round(time.time() - start)
    torch.set_num_threads(args.threads)
    test = ods.CheckedDataset(ods.load_split(args.data, "test"), args.img_size, train=False)
    predictions = yolo_predictions(weights, test, args) if tool == "yolo11n" else odscratch_predictions(weights, test, args)
    metrics = ods.evaluate(predictions, test.targets, len(metrics_classes(args)))
    return {"tool": tool, "seed": seed, "train_s": train_s, "weights": str(weights),
            "extra_args": " ".join([args.odscratch_args, "--fp32" * args.fp32]).strip() if tool == "odscratch" else "",
            **{k: round(metrics[k], 4) for k in METRICS},
            "ap50_per_class": json.dumps([round(v, 3) for v in metrics["ap50_per_class"]])}


def metrics_classes(args):
    return ods.category_feature(ods.load_split(args.data, "train")).names


def read_rows(path):
    return list(csv.DictReader(open(path))) if path.exists() else []


def print_table(rows):
    by_tool = {tool: [r for r in rows if r["tool"] == tool] for tool in TOOLS}
    columns = METRICS
    print(f"| tool | seeds | {' | '.join(columns)} | AP50 per class |")
    print("|---" * (len(columns) + 3) + "|")
    medians = {}
    for tool, runs in by_tool.items():
        if not runs:
            continue
        medians[tool] = {c: statistics.median(float(r[c]) for r in runs) for c in columns}
        per_class = [statistics.median(json.loads(r["ap50_per_class"])[k] for r in runs)
                     for k in range(len(json.loads(runs[0]["ap50_per_class"])))]
        print(f"| {tool} | {len(runs)} | " + " | ".join(f"{medians[tool][c]:.3f}" for c in columns)
              + " | " + " / ".join(f"{v:.3f}" for v in per_class) + " |")
    if len(medians) == 2:
        print("| ratio odscratch / yolo11n | | " + " | ".join(
            f"{medians['odscratch'][c] / max(medians['yolo11n'][c], 1e-9):.2f}" for c in columns) + " | |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="BCCD_Dataset")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    parser.add_argument("--odscratch-args", default="", help="more `odscratch train` options, e.g. '--stride 16'")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved latency rounds")
    parser.add_argument("--runs", type=int, default=20, help="timed single-image forwards per model and round")
    parser.add_argument("--fp32", action="store_true",
                        help="odscratch in float32 even where the CPU has bf16, as on a CPU without it")
    parser.add_argument("--csv", type=Path,
                        help="default: benchmarks/yolo_vs_odscratch[_fp32][_MINUTESmin].csv (no suffix at 15)")
    parser.add_argument("--table", action="store_true", help="only print the table from the CSV")
    args = parser.parse_args()
    budget = "" if args.minutes == 15 else f"_{args.minutes:g}min"
    args.csv = args.csv or Path(f"benchmarks/yolo_vs_odscratch{'_fp32' if args.fp32 else ''}{budget}.csv")
    if not args.table:
        root = BENCH / "yolo-data"
        if not (root / "data.yaml").exists():
            export_yolo_format(args.data, root)
        done = {(r["tool"], r["seed"]) for r in read_rows(args.csv)}
        for seed in args.seeds:  # seed by seed, both tools: a slower hour of the CPU hits both alike
            for tool in args.tools:
                if (tool, str(seed)) not in done:
                    ods.append_row(args.csv, run_tool(tool, seed, root, args))
    print(f"{torch.get_num_threads()} threads, {args.minutes} min per training, test split of {args.data}")
    rows = read_rows(args.csv)
    print_table(rows)
    if {r["tool"] for r in rows} == set(TOOLS):
        latency_table(rows, args)


if __name__ == "__main__":
    main()
