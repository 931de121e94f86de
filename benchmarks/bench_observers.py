"""Cost of observers (qfi.observe): a forward while recording the reference and while measuring,
as a ratio to a plain forward of the same batch, and the cost when off.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_observers.py [--quick | --smoke] [--device cuda]

Models: the ViT-B/16 shape (``qfi.zoo.vit.vit_b_16_shaped()``, random weights) at batch 8, and
the embedded digits ViT on the digits test set (450 images, one batch).  Every leaf module is
observed.  Each row's forwards alternate with plain ones in pairs (plain first, then observed
first, ...), so that load drift hits both alike; its ratio is the median over the pairs of
(observed / plain), its time that ratio times the median plain forward.  "Off" is an observer
that holds a recorded reference but is neither recording nor measuring: it installs no hook,
which the table checks by counting the hooks on every module.  ``--smoke`` runs a tiny ViT of
the same structure instead of ViT-B/16, one pair per row (seconds; CI runs it so the benchmark
cannot rot).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

import qfi
from qfi import zoo
from qfi.zoo.vit import VisionTransformer, vit_b_16_shaped

DEVICE = torch.device("cpu")


def clock() -> float:
    """Wall time after the device has finished its queued work (CUDA runs asynchronously)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter()


def timed(fn: Callable[[], object]) -> float:
    t = clock()
    fn()
    return clock() - t


def hooks_on(model: nn.Module) -> int:
    """Forward (pre-)hooks on every module of the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def tiny_vit() -> VisionTransformer:
    """ViT-B/16's structure and names at a toy size (32 px, patch 8, 2 layers, dim 64)."""
    return VisionTransformer(32, 8, 2, 2, 64, 128, num_classes=10)


def bench(label: str, model: nn.Module, x: torch.Tensor, pairs: int) -> None:
    model = model.eval().to(DEVICE)
    x = x.to(DEVICE)

    def plain() -> None:
        with torch.no_grad():
            model(x)

    plain()  # warm-up
    base_hooks = hooks_on(model)
    obs = qfi.observe(model, max_mb=1e6)  # no limit: the benchmark wants the whole batch
    t_record = timed(lambda: obs.record_reference(plain))
    obs.measure(plain)  # warm-up

    def off_forward() -> None:  # the observer exists and holds its reference, but is off
        plain()
        assert hooks_on(model) == base_hooks, "an observer that is off left hooks behind"

    gold: list[float] = []

    def ratios(fn: Callable[[], object]) -> list[float]:
        """Per pair, fn's time over a plain forward's; the order alternates (ABBA)."""
        out = []
        for i in range(pairs):
            if i % 2:
                t, g = timed(fn), timed(plain)
            else:
                g, t = timed(plain), timed(fn)
            gold.append(g)
            out.append(t / g)
        return out

    off = ratios(off_forward)
    meas = ratios(lambda: obs.measure(plain))
    rec = ratios(lambda: obs.record_reference(plain))
    g = statistics.median(gold)
    print(
        f"\n{label}: {len(obs.names)} leaf modules observed, reference {obs.reference_mb:.1f} MB per "
        f"batch ({'device' if obs.store == 'device' else 'cpu'} memory), {pairs} pairs"
    )
    print(f"{'forward':34s} {'time':>10s} {'/ plain':>8s}  notes")
    print(f"{'plain forward (median)':34s} {g * 1e3:8.1f}ms {1:7.2f}x  no observer")
    print(
        f"{'observer off':34s} {statistics.median(off) * g * 1e3:8.1f}ms {statistics.median(off):7.2f}x  "
        f"hooks added to the model: {hooks_on(model) - base_hooks}"
    )
    print(
        f"{'recording the reference':34s} {statistics.median(rec) * g * 1e3:8.1f}ms "
        f"{statistics.median(rec):7.2f}x  one copy of every observed output "
        f"(first record {t_record * 1e3:.1f} ms)"
    )
    print(
        f"{'measuring against it':34s} {statistics.median(meas) * g * 1e3:8.1f}ms "
        f"{statistics.median(meas):7.2f}x  rmse, mae, max_abs, changed, nonfinite per module"
    )
    obs.clear()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer pairs")
    size.add_argument("--smoke", action="store_true", help="a tiny ViT, not ViT-B/16; one pair (seconds)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]; timings synchronize")
    ap.add_argument("--batch", type=int, default=8, help="ViT-B/16 batch size")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cpu":
        torch.set_num_threads(2)
    pairs = 1 if args.smoke else 3 if args.quick else 7
    print(f"torch {torch.__version__}, device {DEVICE}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    big = tiny_vit() if args.smoke else vit_b_16_shaped()
    label = "tiny ViT (smoke test)" if args.smoke else "ViT-B/16 shape"
    x = torch.randn(args.batch, 3, big.image_size, big.image_size)
    bench(f"{label}, batch {args.batch}", big, x, pairs)
    data = zoo.load_data("digits")
    x = torch.stack([data[i][0] for i in range(len(data))])
    bench(f"embedded ViT (digits), batch {len(x)}", zoo.load_model("vit_digits"), x, pairs)


if __name__ == "__main__":
    main()
