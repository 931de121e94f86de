"""Cost of one weight-fault trial and of activation emulation on a ViT-B/16-shaped model.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_inject.py [--quick]

Prints, from one run: the golden batch-1 forward; qfi's inject+restore per BER trial (fp32 over
all 86.6M weights); two honest baselines (full copy-restore; dense per-bit-plane masks,
extrapolated from one encoder block); the undo log's memory; and the forward overhead of
emulating fp16 / bf16 / int8 outputs on every nn.Linear with a fault armed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import qfi
from qfi.zoo.vit import vit_b_16_shaped


def med(fn, reps: int) -> float:
    """Median wall time of ``fn()`` in seconds (one warm-up call first)."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def dense_block_trial(block: nn.Module, ber: float, g: torch.Generator) -> None:
    """Baseline (b): a torch.rand draw per bit-plane per element of one block, flip, restore."""
    with torch.no_grad():
        for p in block.parameters():
            iv = p.view(-1).view(torch.int32)
            clean = iv.clone()
            mask = torch.zeros_like(iv)
            for b in range(32):
                hit = torch.rand(iv.shape, generator=g) < ber
                mask |= hit.to(torch.int32) << b
            iv ^= mask
            iv.copy_(clean)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    reps = 5 if args.quick else 15
    model = vit_b_16_shaped().eval()
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    x1 = torch.randn(1, 3, 224, 224)
    rows: list[tuple[str, float, str]] = []

    with torch.no_grad():
        golden = med(lambda: model(x1), reps)
    rows.append(("golden forward, batch 1", golden, ""))

    g = torch.Generator().manual_seed(0)
    t_enter = time.perf_counter()
    with qfi.weights(model, "fp32") as w:
        enter = time.perf_counter() - t_enter
        for ber in (1e-9, 1e-6, 1e-4):
            flips: list[int] = []
            undo_bytes: list[int] = []

            def trial(ber: float = ber, flips: list[int] = flips, undo_bytes: list[int] = undo_bytes) -> None:
                with w.inject(qfi.BitFlip(ber=ber), generator=g) as log:
                    flips.append(log.flips)
                    undo_bytes.append(sum(i.numel() * 8 + r.numel() * 4 for _, i, r in w._pending))

            t = med(trial, reps * 4 if ber < 1e-4 else reps)
            extra = (f"mean flips {statistics.mean(flips):.1f}; undo log "
                     f"{statistics.mean(undo_bytes) / 1e6:.3f} MB = "
                     f"{100 * statistics.mean(undo_bytes) / (4 * n_params):.4f}% of the model")
            rows.append((f"qfi inject+restore, BER {ber:g}", t, extra))
    rows.append(("qfi session enter+exit (once per session)", enter, "flat buffer copy"))

    def copy_restore() -> None:  # baseline (a): clone everything, flip 2.8k bits, copy back
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p in params[::7]:
                p.view(-1).view(torch.int32)[:50] ^= 1 << 30
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)

    rows.append(("baseline (a) full copy-restore", med(copy_restore, reps), "clone all + copy back"))
    block = model.encoder.layers[0]
    n_block = sum(p.numel() for p in block.parameters())
    tb = med(lambda: dense_block_trial(block, 1e-6, g), 1 if args.quick else 3)
    rows.append(("baseline (b) dense per-bit masks (extrap.)", tb * n_params / n_block,
                 f"1 block {tb:.2f} s x {n_params / n_block:.1f}"))

    print(f"\nViT-B/16-shaped, {n_params:,} parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print(f"{'weight-fault trial (fp32, all weights)':46s} {'time':>11s} {'/ golden':>10s}  notes")
    for name, t, note in rows:
        print(f"{name:46s} {t * 1e3:9.3f}ms {100 * t / golden:9.4f}%  {note}")

    # activation emulation: batch-8 forward, every nn.Linear output quantized, fault armed
    # golden and emulated forwards alternate so that load drift hits both alike
    x8 = torch.randn(8, 3, 224, 224)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]  # mlp.0, mlp.3, heads.head
    n_act = max(3, reps // 3)
    head = f"activation emulation, batch 8, {len(linears)} nn.Linear outputs"
    print(f"\n{head:46s} {'golden':>9s} {'emulated':>9s} {'overhead':>9s}")
    with torch.no_grad():
        for fmt in ("fp16", "bf16", "int8"):
            gold_t, emu_t = [], []
            with qfi.activations(model, fmt, names=[f"re:^{n}$" for n in linears], calibrate=[x1]) as act, \
                    act.inject(qfi.BitFlip(ber=1e-7), seed=0):
                model(x8)
                for _ in range(n_act):
                    t = time.perf_counter()
                    model(x8)
                    emu_t.append(time.perf_counter() - t)
                    act.disarm()
                    act._mode = "off"  # hooks inert: a golden forward
                    t = time.perf_counter()
                    model(x8)
                    gold_t.append(time.perf_counter() - t)
                    act._mode = "run"
                    act.arm(qfi.BitFlip(ber=1e-7), seed=0)
            g8, e8 = statistics.median(gold_t), statistics.median(emu_t)
            print(f"{fmt + ' outputs, BitFlip(1e-7) armed':46s} {g8 * 1e3:7.1f}ms {e8 * 1e3:7.1f}ms "
                  f"{100 * (e8 - g8) / g8:8.2f}%")


if __name__ == "__main__":
    main()
