"""Train the demo RetinaNet on synthetic brain MR slices, on a CPU (development tooling).

The model is torchvision's RetinaNet in the compact ``mobilenet_v3_fpn64`` layout of
``retinaedge.export.torchload`` (about 3.6 M parameters), trained from scratch (no pretrained weights
exist offline) on slices from ``tools/phantom`` studies whose seeds are ``--seed-base`` ..
``--seed-base + --studies - 1``. Held-out evaluation uses other seeds (see models/demo/MODEL_CARD.md).

Every slice goes through the runtime's own preprocessing (``retinaedge.runtime.preprocess``: robust
min-max between the 0.5 and 99.5 percentiles, the demo bundle's window policy; then the letterbox to the
model input), so the network sees at training time exactly what the appliance gives it.

Usage (about 30-60 min on 2 cores):
    .venv/bin/python tools/train_demo.py --out /tmp/demo/checkpoint.pt --studies 600 --iterations 3000

Writes ``--out`` (``{"model": state_dict, "meta": {...}}``, loadable by ``retinaedge export --arch
resnet18_c4_fpn96``) every ``--save-every`` iterations and at the end. Progress goes to the log.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from phantom.lesions import KINDS  # noqa: E402
from phantom.study import make_series  # noqa: E402
from retinaedge.runtime.geometry import Letterbox  # noqa: E402
from retinaedge.runtime.manifest import WindowPolicy  # noqa: E402
from retinaedge.runtime.preprocess import robust_minmax  # noqa: E402

log = logging.getLogger("train_demo")

ARCH = "mobilenet_v3_fpn64"
INPUT = 256
MIN_BOX_PX = 3.0


def unit_image(pixels: np.ndarray) -> np.ndarray:
    """uint16 slice ``(rows, cols)`` -> float32 ``(INPUT, INPUT)`` 0..1, as the runtime preprocesses it."""
    unit = robust_minmax(pixels.astype(np.float64), WindowPolicy(policy="minmax").percentiles).astype(
        np.float32
    )
    box = Letterbox.fit(unit.shape[0], unit.shape[1], INPUT, INPUT)
    return box.apply(unit[None], 0.0)[0]


def _study(seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(unit image float16, boxes (B, 4) float32 in input pixels, labels (B,) int64) per rendered slice."""
    series = make_series(seed, slice_subset="lesions")
    out = []
    for s in range(len(series.pixels)):
        img = unit_image(series.pixels[s])
        scale = INPUT / max(series.pixels.shape[1:])
        boxes = [
            (b.x1 * scale, b.y1 * scale, b.x2 * scale, b.y2 * scale, KINDS.index(b.label))
            for b in series.boxes[s]
            if min(b.x2 - b.x1, b.y2 - b.y1) * scale >= MIN_BOX_PX
        ]
        arr = np.array([b[:4] for b in boxes], np.float32).reshape(-1, 4)
        out.append((img.astype(np.float16), arr, np.array([b[4] for b in boxes], np.int64)))
    return out


def build_dataset(seeds: list[int], workers: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Render the training slices of ``seeds`` in ``workers`` processes."""
    t = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_study, seeds, chunksize=4)
    data = [item for part in parts for item in part]
    positives = sum(1 for _, b, _ in data if len(b))
    per_class = np.bincount(np.concatenate([lab for _, _, lab in data]), minlength=len(KINDS))
    log.info(
        "dataset: %d slices (%d with lesions, %d boxes: %s) from %d studies in %.0f s",
        len(data),
        positives,
        int(per_class.sum()),
        ", ".join(f"{k} {n}" for k, n in zip(KINDS, per_class.tolist(), strict=True)),
        len(seeds),
        time.perf_counter() - t,
    )
    return data


def positive_weights(data: list[tuple[np.ndarray, np.ndarray, np.ndarray]], pos: list[int]) -> np.ndarray:
    """Sampling probability of each positive slice so that every class is drawn about equally often.

    A slice's weight is the mean of ``1 / boxes of that class`` over its boxes; ``(len(pos),)`` summing to 1.
    """
    counts = np.bincount(np.concatenate([data[i][2] for i in pos]), minlength=len(KINDS)).astype(np.float64)
    inverse = 1.0 / np.maximum(counts, 1.0)
    weights = np.array([inverse[data[i][2]].mean() for i in pos])
    return weights / weights.sum()


def augment(img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Left-right flip and a mild gamma on the 0..1 image."""
    img = img.astype(np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1].copy()
        boxes = boxes.copy()
        boxes[:, [0, 2]] = INPUT - boxes[:, [2, 0]]
    gamma = float(np.exp(rng.uniform(-0.2, 0.2)))
    return np.clip(img, 0.0, 1.0) ** gamma, boxes


def make_model(torch: Any) -> Any:
    from retinaedge.export.torchload import build_retinanet

    model = build_retinanet(ARCH, len(KINDS), frozen_bn=False)
    model.transform.min_size = (INPUT,)
    model.transform.max_size = INPUT
    return model


def train(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(args.seed_base)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed_base)
    data = build_dataset(list(range(args.seed_base, args.seed_base + args.studies)), args.workers)
    pos = [i for i, d in enumerate(data) if len(d[1])]
    neg = [i for i, d in enumerate(data) if not len(d[1])]
    pos_p = positive_weights(data, pos) if args.class_balance else None
    model = make_model(torch)
    args.previous = None
    if args.resume:
        state = torch.load(args.resume, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        args.previous = state.get("meta")
        log.info("resumed from %s (%s)", args.resume, (args.previous or {}).get("iterations"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = min(300, args.iterations // 10)

    def lr_at(it: int) -> float:
        if it < warmup:
            return args.lr * (0.1 + 0.9 * it / warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, args.iterations - warmup)))

    t0 = time.perf_counter()
    running: dict[str, float] = {}
    for it in range(args.iterations):
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        n_pos = int(round(args.batch * 0.75))
        idx = list(rng.choice(pos, n_pos, p=pos_p)) + list(rng.choice(neg, args.batch - n_pos))
        images, targets = [], []
        for i in idx:
            img, boxes = augment(data[i][0], data[i][1], rng)
            images.append(torch.from_numpy(np.repeat(img[None], 3, axis=0)))
            targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(data[i][2])})
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        for k, v in losses.items():
            running[k] = 0.98 * running.get(k, v.item()) + 0.02 * v.item()
        if (it + 1) % 50 == 0:
            rate = (it + 1) / (time.perf_counter() - t0)
            log.info(
                "it %d/%d lr %.2e %s  %.2f it/s, eta %.0f min",
                it + 1,
                args.iterations,
                lr_at(it),
                " ".join(f"{k} {v:.3f}" for k, v in running.items()),
                rate,
                (args.iterations - it - 1) / rate / 60,
            )
        if (it + 1) % args.save_every == 0 or it + 1 == args.iterations:
            save(torch, model, args, it + 1)


def save(torch: Any, model: Any, args: argparse.Namespace, iterations: int) -> None:
    meta = {
        "architecture": ARCH,
        "class_names": list(KINDS),
        "input_size": [INPUT, INPUT],
        "channels": 1,
        "window": "minmax",
        "iterations": iterations,
        "batch": args.batch,
        "lr": args.lr,
        "train_seeds": [args.seed_base, args.seed_base + args.studies - 1],
        "class_balance": bool(args.class_balance),
        "torch": str(torch.__version__),
    }
    if args.previous:
        meta["resumed_from"] = args.previous
    tmp = args.out.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "meta": meta}, tmp)
    tmp.replace(args.out)
    log.info("saved %s at iteration %d", args.out, iterations)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    p.add_argument("--studies", type=int, default=600, help="synthetic studies to draw slices from")
    p.add_argument("--seed-base", type=int, default=0, help="first study seed (training seeds)")
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="processes rendering the dataset")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--resume", type=Path, help="start from this checkpoint's weights (a fresh schedule)")
    p.add_argument(
        "--class-balance",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="draw slices with tumours so that each class is about equally frequent",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
