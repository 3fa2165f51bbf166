"""Single-image latency (model + decoding) and training throughput, float32 vs bf16 + channels_last.

    python benchmarks/latency.py [--weights runs/train/exp/best.pt] [--runs 50]

Latency does not depend on the weights, so without --weights a fresh default-size model is timed.
Prints medians with the 10th-90th percentile spread; not part of CI.
"""

import argparse
import statistics
import time

import torch

import odscratch as ods


def percentiles(times_ms):
    q = statistics.quantiles(times_ms, n=10)
    return f"{statistics.median(times_ms):7.1f} ms  (p10 {q[0]:.1f}, p90 {q[-1]:.1f})"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--img-size", type=int, default=ods.Config.img_size)
    parser.add_argument("--stride", type=int, default=ods.Config.stride)
    args = parser.parse_args()
    if args.weights:
        model, cfg, classes = ods.load_detector(args.weights, torch.device("cpu"))
        size, num_classes = cfg.img_size, len(classes)
    else:
        size, num_classes = args.img_size, 3
        model = ods.GridDetector(num_classes, args.stride).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {size}x{size}, stride {model_stride(model)}")
    modes = [("float32", False, torch.contiguous_format), ("bf16", True, torch.contiguous_format),
             ("bf16 + channels_last", True, torch.channels_last)]
    for mode, bf16, memory in modes:
        model = model.to(memory_format=memory)
        image = torch.rand(1, 3, size, size).to(memory_format=memory)
        times = []
        for i in range(args.runs + 5):  # 5 warm-up runs
            start = time.perf_counter()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                boxes, logits = model(image)
            found = ods.score_cells(boxes, logits)
            ods.select_detections(*found, [(size, size)], ods.DETECT_CONF, ods.NMS_IOU)
            if i >= 5:
                times.append((time.perf_counter() - start) * 1000)
        print(f"{mode:21s} detect 1 image: {percentiles(times)}")
    for mode, bf16, memory in modes:
        train = ods.GridDetector(num_classes, model_stride(model))
        train = train.to(memory_format=memory)
        optimizer = torch.optim.AdamW(train.parameters())
        images = torch.rand(16, 3, size, size).to(memory_format=memory)
        rates = []
        for i in range(8):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                boxes, logits = train(images)
            (boxes.sum() + logits.sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
            if i >= 2:
                rates.append(len(images) / (time.perf_counter() - start))
        print(f"{mode:21s} train step, batch {len(images)}: "
              f"{statistics.median(rates):.1f} images/s (median of {len(rates)} steps)")


def model_stride(model):
    return {v: k for k, v in ods.BACKBONE_CHANNELS.items()}[model.head.in_features]


if __name__ == "__main__":
    main()
