"""Where a training step's time goes, beside the bare network, and what the first epoch costs extra.

    python benchmarks/step_time.py            # the default run's settings, bf16 if the CPU has it
    python benchmarks/step_time.py --fp32     # float32
    python benchmarks/step_time.py --data BCCD_Dataset --img-size 320

Steady state (after warm-up steps): per step, the data (decode, augment, collate, from the decoded
cache as in epoch 2 on), forward, loss (cell assignment included), backward and the optimizer (zero,
clip, AdamW step), timed with the same code `train_epoch` runs; then the bare network (ResNet-18 to
the grid + the linear head, forward + backward + AdamW on random images and a plain loss) at the
same batch, size and precision. Start-up: making the built-in data (first time on this machine, then
from datasets' cache), the readability check that also fills the decoded cache, and one validation
pass (predict + COCO mAP) on an untrained model. Median of --steps steps. Not part of CI.
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn

import odscratch as ods


def clock(timings, name, start):
    timings.setdefault(name, []).append(time.perf_counter() - start)
    return time.perf_counter()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--img-size", type=int, default=ods.Config.img_size)
    parser.add_argument("--batch", type=int, default=ods.Config.batch)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--fp32", action="store_true")
    args = parser.parse_args()
    cfg = ods.RunConfig(data=args.data, img_size=args.img_size, batch=args.batch, fp32=args.fp32)
    device = torch.device("cpu")
    bf16 = ods.use_bf16(device, cfg.fp32)
    print(f"CPU: {ods.cpu_kind()}; {torch.get_num_threads()} threads; {'bf16' if bf16 else 'float32'}; "
          f"{args.data} at {args.img_size} px, "
          f"batch {args.batch}")

    start = time.perf_counter()
    train_ds = ods.load_split(cfg.data, "train", cfg.bbox_format)
    val_ds = ods.load_split(cfg.data, "validation", cfg.bbox_format)
    made = time.perf_counter() - start
    start = time.perf_counter()
    data = ods.CheckedDataset(train_ds, cfg.img_size, train=True)
    val = ods.CheckedDataset(val_ds, cfg.img_size, train=False)
    checked = time.perf_counter() - start
    classes = ods.class_names(train_ds)
    model = ods.GridDetector(len(classes), cfg.stride, cfg.assign_radius)
    model = model.to(memory_format=ods.MEMORY_FORMAT)
    start = time.perf_counter()
    found = ods.predict(ods.model_network(model, bf16), val, cfg.batch, ods.EVAL_CONF, ods.NMS_IOU)
    ods.evaluate(found, val.targets, len(classes))
    validated = time.perf_counter() - start
    print(f"start-up: data loaded {made:.1f} s (the first time on a machine: also drawn), "
          f"readability check + decoded cache {checked:.1f} s ({len(data)} + {len(val)} images), "
          f"one validation pass (untrained model) {validated:.1f} s")

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    generator = torch.Generator().manual_seed(0)
    timings = {}
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            timings = {}
        t = time.perf_counter()
        indices = torch.randint(len(data), (args.batch,), generator=generator).tolist()
        images, targets = ods.collate([data[i] for i in indices])
        t = clock(timings, "data", t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = model(images.to(device, memory_format=ods.MEMORY_FORMAT))
        t = clock(timings, "forward", t)
        parts, _ = ods.detection_loss(*outputs, targets, cfg.img_size, cfg.assign_radius)
        t = clock(timings, "loss", t)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        t = clock(timings, "backward", t)
        nn.utils.clip_grad_norm_(model.parameters(), ods.GRAD_CLIP)
        optimizer.step()
        clock(timings, "optimizer", t)

    bare = ods.GridDetector(len(classes), cfg.stride).to(memory_format=ods.MEMORY_FORMAT)
    bare_optimizer = torch.optim.AdamW(bare.parameters(), lr=cfg.lr)
    images = torch.rand(args.batch, 3, cfg.img_size, cfg.img_size)
    bare_times = []
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            boxes, logits = bare(images.to(device, memory_format=ods.MEMORY_FORMAT))
        (boxes.mean() + logits.mean()).backward()
        bare_optimizer.step()
        bare_optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            bare_times.append(time.perf_counter() - t)

    median = {name: statistics.median(values) * 1000 for name, values in timings.items()}
    step_ms, bare_ms = sum(median.values()), statistics.median(bare_times) * 1000
    parts = ", ".join(f"{name} {ms:.1f} ms" for name, ms in median.items())
    print(f"steady-state step, median of {args.steps}: {parts}; total {step_ms:.1f} ms "
          f"({args.batch / step_ms * 1000:.1f} images/s)")
    network = median["forward"] + median["backward"] + median["optimizer"]
    outside = (median["data"] + median["loss"]) / step_ms
    print(f"inside the network (forward + backward + optimizer): {network:.1f} ms; bare network "
          f"forward + backward + AdamW: {bare_ms:.1f} ms ({args.batch / bare_ms * 1000:.1f} "
          f"images/s); outside the network (data + loss): {outside:.0%} of the step; the whole "
          f"step is {step_ms / bare_ms - 1:+.0%} over the bare network")


if __name__ == "__main__":
    main()
