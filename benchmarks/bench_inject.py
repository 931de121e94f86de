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
    ap.add_argument("--only", choices=("weights", "activations"), default=None, help="run one half")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    reps = 5 if args.quick else 15
    model = vit_b_16_shaped().eval()
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    x1 = torch.randn(1, 3, 224, 224)
    rows: list[tuple[str, float, float | None, str]] = []

    if args.only != "activations":
        # Rounds of [one golden forward, a batch of trials per BER]: each round gives a ratio
        # measured under the same load, and the report takes the median over rounds.
        rounds = 4 if args.quick else 9
        per_round = {1e-9: 40, 1e-6: 40, 1e-4: 3}
        g = torch.Generator().manual_seed(0)
        goldens: list[float] = []
        with torch.no_grad():  # warm-up
            model(x1)
            model(x1)
        for flat in (True, False):
            mode = "flat buffer" if flat else "in place"
            t_enter = time.perf_counter()
            with qfi.weights(model, "fp32", flat=flat) as w:
                enter = time.perf_counter() - t_enter
                ratios: dict[float, list[float]] = {b: [] for b in per_round}
                times: dict[float, list[float]] = {b: [] for b in per_round}
                flips: dict[float, list[int]] = {b: [] for b in per_round}
                undo: dict[float, list[int]] = {b: [] for b in per_round}
                for _ in range(rounds):
                    with torch.no_grad():
                        t = time.perf_counter()
                        model(x1)
                        gold = time.perf_counter() - t
                    goldens.append(gold)
                    for ber, n in per_round.items():
                        fault = qfi.BitFlip(ber=ber)
                        ts = []
                        for _ in range(n):
                            t = time.perf_counter()
                            with w.inject(fault, generator=g) as log:
                                k = log.flips
                            ts.append(time.perf_counter() - t)
                            flips[ber].append(k)
                            undo[ber].append(k * 12)  # per flipped word: int64 index + int32 old word
                        times[ber].append(statistics.median(ts))
                        ratios[ber].append(statistics.median(ts) / gold)
                for ber in per_round:
                    mb = statistics.mean(undo[ber]) / 1e6
                    extra = (
                        f"mean flips {statistics.mean(flips[ber]):.1f}; undo log <= {mb:.3f} MB "
                        f"= {100 * mb * 1e6 / (4 * n_params):.4f}% of the model"
                    )
                    rows.append(
                        (
                            f"qfi {mode}, BER {ber:g}",
                            statistics.median(times[ber]),
                            statistics.median(ratios[ber]),
                            extra,
                        )
                    )
            rows.append(
                (
                    f"qfi {mode}: session enter (once)",
                    enter,
                    None,
                    "moves the weights into one buffer (originals released)" if flat else "no copy",
                )
            )
        golden = statistics.median(goldens)
        rows.insert(0, ("golden forward, batch 1 (median)", golden, 1.0, f"{len(goldens)} forwards"))

        def copy_restore() -> None:  # baseline (a): clone everything, flip 2.8k bits, copy back
            with torch.no_grad():
                saved = [p.detach().clone() for p in params]
                for p in params[::7]:
                    p.view(-1).view(torch.int32)[:50] ^= 1 << 30
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)

        rows.append(
            ("baseline (a) full copy-restore", med(copy_restore, reps), None, "clone all + copy back")
        )
        block = model.encoder.layers[0]
        n_block = sum(p.numel() for p in block.parameters())
        tb = med(lambda: dense_block_trial(block, 1e-6, g), 1 if args.quick else 3)
        rows.append(
            (
                "baseline (b) dense per-bit masks (extrap.)",
                tb * n_params / n_block,
                None,
                f"1 block {tb:.2f} s x {n_params / n_block:.1f}",
            )
        )

        print(
            f"\nViT-B/16-shaped, {n_params:,} parameters, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads\n"
        )
        print(f"{'weight-fault trial (fp32, all weights)':46s} {'time':>11s} {'/ golden':>10s}  notes")
        for name, t, ratio, note in rows:
            r = t / golden if ratio is None else ratio
            print(f"{name:46s} {t * 1e3:9.3f}ms {100 * r:9.4f}%  {note}")
        print(
            "qfi rows: median over rounds of (median trial time / that round's golden forward);"
            " other rows: time / median golden forward"
        )

    if args.only != "weights":
        # activation emulation: batch-8 forward, every nn.Linear output quantized, fault armed
        # golden and emulated forwards alternate so that load drift hits both alike
        x8 = torch.randn(8, 3, 224, 224)
        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]  # mlp.0, mlp.3, heads.head
        n_act = max(3, reps // 2)
        head = f"activation emulation, batch 8, {len(linears)} nn.Linear outputs"
        print(f"\n{head:46s} {'golden':>9s} {'emulated':>9s} {'overhead':>9s} {'hook work':>10s}")
        with torch.no_grad():
            # the Linear outputs of one batch-8 forward, to time the hooks' own work directly
            outs: dict[str, torch.Tensor] = {}
            mods = dict(model.named_modules())
            rec = [
                mods[n].register_forward_hook(lambda _m, _i, o, n=n: outs.__setitem__(n, o)) for n in linears
            ]
            model(x8)
            for h in rec:
                h.remove()
            for fmt in ("fp16", "bf16", "int8"):
                gold_t, emu_t = [], []
                with (
                    qfi.activations(model, fmt, names=[f"re:^{n}$" for n in linears], calibrate=[x1]) as act,
                    act.inject(qfi.BitFlip(ber=1e-7), seed=0),
                ):
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
                    # the same hooks called on the recorded outputs: their work, free of forward noise
                    hooks = [(mods[n], act._hook(act.names.index(n))) for n in linears]
                    work = med(
                        lambda hooks=hooks: [
                            h(m, None, outs[n]) for (m, h), n in zip(hooks, linears, strict=True)
                        ],
                        reps,
                    )
                g8, e8 = statistics.median(gold_t), statistics.median(emu_t)
                paired = statistics.median(e / g - 1 for e, g in zip(emu_t, gold_t, strict=True))
                print(
                    f"{fmt + ' outputs, BitFlip(1e-7) armed':46s} {g8 * 1e3:7.1f}ms {e8 * 1e3:7.1f}ms "
                    f"{100 * paired:8.2f}% {100 * work / g8:9.2f}%"
                )
        print(
            "overhead: end to end, median over pairs of alternating emulated and golden (hooks inert)"
            " forwards (noisy under load);"
            " hook work: the hooks timed alone on recorded outputs, as a share of the golden forward"
        )


if __name__ == "__main__":
    main()
