"""Which runtime to ship on a CPU: odscratch's BCCD models in PyTorch, onnxruntime float32 and int8,
against YOLO11n as Ultralytics runs it, in one run on one machine.

Takes the models that `benchmarks/yolo_vs_odscratch.py --fp32` trained (one YOLO11n and one
odscratch model per seed, listed in its CSV) and, for each odscratch seed:
  1. exports model.onnx and three int8 versions of it (`odscratch export --int8` with other nodes
     left in float: none, the head and what follows it (what `export --int8` ships), the head and
     the first convolution too), each calibrated on the same 200 training images;
  2. scores every runtime on the test split with odscratch's `evaluate` (YOLO11n's scores come from
     the CSV: the same evaluator on the same test images).
Then, for the seed-0 models, the latency of one BCCD test image (640 x 480, resized to 320 px), from
the decoded image to the boxes: YOLO11n's `predict` (float32, BatchNorm fused: its CPU default) and
odscratch's `Detector` in each runtime, --threads threads, median of --rounds x --calls calls taken
in interleaved rounds, so that a busy moment of the machine slows all of them alike.

    python benchmarks/yolo_vs_odscratch.py --data BCCD_Dataset --fp32   # trains the models
    python benchmarks/ship_on_cpu.py --data BCCD_Dataset                # ~2 min
    python benchmarks/ship_on_cpu.py --data BCCD_Dataset --fp32         # as on a CPU without bf16
"""
import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import torch
from onnxruntime import quantization

import odscratch as ods

FLOAT_NODES = {  # int8 variant -> the nodes of the prepared graph left in float
    "int8, all": lambda nodes: [],
    "int8, head float (shipped)": lambda nodes: [n.name for n in nodes[head_index(nodes):]],
    "int8, head + first conv float": lambda nodes: [n.name for n in nodes[head_index(nodes):]]
    + [next(n.name for n in nodes if n.op_type == "Conv")],
}


def head_index(nodes):
    return next(i for i, node in enumerate(nodes) if node.op_type == "MatMul")


def quantize_leaving_float(path, out, calibration, float_nodes):
    """ods.quantize_onnx with other nodes left in float: its quantize_static call patched."""
    original = quantization.quantize_static

    def quantize_static(model, output, reader, **options):
        options["nodes_to_exclude"] = float_nodes(onnx.load(model).graph.node)
        return original(model, output, reader, **options)

    quantization.quantize_static = quantize_static
    try:
        return ods.quantize_onnx(path, out, calibration)
    finally:
        quantization.quantize_static = original


def odscratch_runtimes(weights, data, folder, fp32):
    """best.pt -> {runtime: ods.Detector}: PyTorch, onnxruntime float32 and each int8 variant."""
    _, cfg, _ = ods.load_detector(weights, torch.device("cpu"))
    detectors = {"PyTorch float32": ods.Detector.load(weights, "cpu", fp32=True)}
    if ods.use_bf16(torch.device("cpu"), fp32):
        detectors["PyTorch bf16"] = ods.Detector.load(weights, "cpu")
    path = ods.export_onnx(weights, folder / "model.onnx")
    detectors["onnxruntime float32"] = ods.Detector.load(path)
    calibration = ods.calibration_images(cfg, data, cfg.img_size)
    for i, (name, float_nodes) in enumerate(FLOAT_NODES.items()):
        out = folder / f"model_int8_{i}.onnx"
        quantize_leaving_float(path, out, calibration, float_nodes)
        detectors[f"onnxruntime {name}"] = ods.Detector.load(out)
    return detectors


def yolo_detector(weights, img_size):
    """YOLO11n as a user runs it: Ultralytics' predict on a PIL image, its defaults, on the CPU."""
    from ultralytics import YOLO
    model = YOLO(weights)
    return lambda image: model.predict(image, imgsz=img_size, device="cpu", verbose=False)


def latencies(calls_by_name, image, rounds, calls):
    """{name: a function of one image} -> {name: median ms per call}, in interleaved rounds. Per
    call, not bench_detectors' mean per round: YOLO11n's predict has occasional slow calls, which
    a mean counts in (it put YOLO11n at 15-18 ms, against 11-13 ms per call)."""
    times = {name: [] for name in calls_by_name}
    for _ in range(rounds):
        for name, call in calls_by_name.items():
            for _ in range(calls):
                start = time.perf_counter()
                call(image)
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="BCCD_Dataset")
    parser.add_argument("--csv", type=Path, default=Path("benchmarks/yolo_vs_odscratch_fp32.csv"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--fp32", action="store_true",
                        help="no PyTorch bf16 row, as on a CPU without bf16")
    parser.add_argument("--also", type=Path, action="append", default=[],
                        help="another odscratch best.pt (one trained at a smaller size, say): its "
                        "int8 model is timed and scored beside the others")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    weights = {(r["tool"], int(r["seed"])): r["weights"] for r in rows}
    yolo_scores = {int(r["seed"]): r for r in rows if r["tool"] == "yolo11n"}
    img_size = ods.load_detector(weights["odscratch", 0], torch.device("cpu"))[1].img_size
    test = ods.CheckedDataset(ods.load_split(args.data, "test"), img_size, train=False)
    print(f"{ods.cpu_kind()}, {torch.get_num_threads()} threads; "
          f"test split of {args.data}: {len(test)} images")
    scores, detectors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in sorted(s for tool, s in weights if tool == "odscratch"):
            folder = Path(tmp) / f"s{seed}"
            folder.mkdir()
            runtimes = odscratch_runtimes(weights["odscratch", seed], args.data, folder, args.fp32)
            for name, detector in runtimes.items():
                metrics, _ = detector.evaluate(test, 16)
                scores.setdefault(name, []).append((metrics["map50"], metrics["map"]))
                print(f"seed {seed} {name}: "
                      f"mAP50 {metrics['map50']:.4f} mAP50-95 {metrics['map']:.4f}")
            detectors = detectors or runtimes  # the seed-0 models are timed
        for i, weights_also in enumerate(args.also):
            folder = Path(tmp) / f"also{i}"
            folder.mkdir()
            _, cfg, _ = ods.load_detector(weights_also, torch.device("cpu"))
            out = folder / "model_int8.onnx"
            ods.quantize_onnx(ods.export_onnx(weights_also, folder / "model.onnx"), out,
                              ods.calibration_images(cfg, args.data, cfg.img_size))
            name = f"onnxruntime int8, {weights_also} ({cfg.img_size} px)"
            detectors[name] = ods.Detector.load(out)
            own_size = ods.CheckedDataset(test.ds, cfg.img_size, train=False)
            metrics, _ = detectors[name].evaluate(own_size, 16)
            scores[name] = [(metrics["map50"], metrics["map"])]
        image = ods.open_image(test.ds[0]["image"]).convert("RGB")
        yolo = yolo_detector(weights["yolo11n", 0], img_size)
        calls = {"YOLO11n, Ultralytics predict, float32": yolo,
                 **{f"odscratch, {name}": detector for name, detector in detectors.items()}}
        for call in calls.values():
            for _ in range(5):  # warm-up: the first calls allocate memory and pick kernels
                call(image)
        torch.set_num_threads(args.threads)  # Ultralytics' first predict sets the CPU count - 1
        ms = latencies(calls, image, args.rounds, args.calls)
        assert torch.get_num_threads() == args.threads
    yolo = next(iter(ms.values()))
    print(f"\none {image.width} x {image.height} test image at {img_size} px, image to boxes, "
          f"{args.threads} threads, median of {args.rounds} x {args.calls} interleaved calls")
    print("| runtime | latency | / YOLO11n | test mAP50 | test mAP50-95 |\n|---|---|---|---|---|")
    yolo_rows = yolo_scores.values()
    print(f"| {next(iter(ms))} | {yolo:.1f} ms | 1.00 | "
          f"{statistics.median(float(r['map50']) for r in yolo_rows):.3f} | "
          f"{statistics.median(float(r['map']) for r in yolo_rows):.3f} |")
    for name, values in scores.items():
        latency = ms[f"odscratch, {name}"]
        print(f"| odscratch, {name} | {latency:.1f} ms | {latency / yolo:.2f} | "
              f"{statistics.median(v[0] for v in values):.3f} | "
              f"{statistics.median(v[1] for v in values):.3f} |")
    print(f"\nmAP: median of {len(yolo_rows)} seeds; per seed (mAP50 / mAP50-95):")
    for name, values in scores.items():
        print(f"  {name}: " + ", ".join(f"{a:.3f} / {b:.3f}" for a, b in values))


if __name__ == "__main__":
    main()
