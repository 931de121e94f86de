"""Cost of one weight-fault trial and of activation emulation on a ViT-B/16-shaped model.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_inject.py [--quick | --smoke] [--format int8,mxfp4,nvfp4]

Prints, from one run: the golden batch-1 forward; qfi's inject+restore per BER trial (fp32 over
all 86.6M weights); two honest baselines (full copy-restore; dense per-bit-plane masks,
extrapolated from one encoder block); the undo log's memory; and the forward overhead of
emulating fp16 / bf16 / int8 outputs on every nn.Linear with a fault armed.  ``--format`` adds a
table of one weight-fault trial at BER 1e-6 over all weights per format (every stored bit: codes
and, for block / group formats, scale words), with its ratio to the first format listed
(``--format int8,mxfp4``: mxfp4's trial cost as a multiple of int8's); ``--only formats`` prints
that table alone.

``--smoke`` runs every measurement once or twice on a tiny ViT of the same structure (a few
seconds; CI runs it so the benchmark cannot rot), ``--quick`` the real shape with fewer rounds.
Only qfi's public API is used.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import qfi
from qfi.errors import QfiError
from qfi.zoo.vit import VisionTransformer, vit_b_16_shaped


@dataclass(frozen=True)
class Plan:
    """How much to measure: the model and the number of rounds and repetitions."""

    label: str
    model: Callable[[], VisionTransformer]
    rounds: int  # weight faults: rounds of [one golden forward, trials per BER]
    trials: dict[float, int]  # weight faults: trials per BER in one round
    reps: int  # repetitions of the baselines and of the replayed hooks
    dense_reps: int  # repetitions of the dense per-bit-mask block trial
    pairs: int  # activation emulation: (golden, emulated) forward pairs per format
    batch: int  # activation emulation: batch size
    conv: tuple[int, int]  # conv feature maps: (batch, image size)


def tiny_vit() -> VisionTransformer:
    """A ViT with ViT-B/16's structure and names at a toy size (32 px, patch 8, 2 layers, dim 64)."""
    return VisionTransformer(32, 8, 2, 2, 64, 128, num_classes=10)


PLANS = {
    "full": Plan("ViT-B/16-shaped", vit_b_16_shaped, 9, {1e-9: 40, 1e-6: 40, 1e-4: 3}, 15, 3, 9, 8, (64, 64)),
    "quick": Plan("ViT-B/16-shaped", vit_b_16_shaped, 4, {1e-9: 40, 1e-6: 40, 1e-4: 3}, 5, 1, 5, 8, (64, 64)),
    "smoke": Plan("tiny ViT (smoke test)", tiny_vit, 2, {1e-9: 3, 1e-6: 3, 1e-4: 2}, 2, 1, 2, 2, (2, 16)),
}


DEVICE = torch.device("cpu")


def clock() -> float:
    """Wall time after the device has finished its queued work (CUDA runs asynchronously)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter()


def med(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn()`` in seconds (one warm-up call first)."""
    fn()
    ts = []
    for _ in range(reps):
        t = clock()
        fn()
        ts.append(clock() - t)
    return statistics.median(ts)


def forward_time(model: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        t = clock()
        model(x)
        return clock() - t


def trial_time(
    w: qfi.WeightSession, fault: object, n: int, g: torch.Generator, flips: list[int],
    after: Callable[[qfi.FaultLog], object] | None = None,
) -> float:
    """Median wall time of ``n`` trials (apply, read the flip count, undo); appends the counts
    and calls ``after(log)`` on each trial's log once its timing is taken."""
    ts = []
    for _ in range(n):
        t = clock()
        with w.inject(fault, generator=g) as log:
            k = log.flips
        ts.append(clock() - t)
        flips.append(k)
        if after is not None:
            after(log)
    return statistics.median(ts)


def dense_block_trial(block: nn.Module, ber: float, g: torch.Generator) -> None:
    """Baseline (b): a torch.rand draw per bit-plane per element of one block, flip, restore."""
    with torch.no_grad():
        for p in block.parameters():
            iv = p.view(-1).view(torch.int32)
            clean = iv.clone()
            mask = torch.zeros_like(iv)
            for b in range(32):
                hit = torch.rand(iv.shape, generator=g, device=g.device) < ber
                mask |= hit.to(torch.int32) << b
            iv ^= mask
            iv.copy_(clean)


def bench_weights(model: VisionTransformer, x1: Tensor, plan: Plan) -> None:
    """The weight-fault table: qfi per BER (both session layouts), then the two baselines."""
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    rows: list[tuple[str, float, float | None, str]] = []
    # Rounds of [one golden forward, a batch of trials per BER]: each round gives a ratio
    # measured under the same load, and the report takes the median over rounds.
    g = torch.Generator().manual_seed(0)
    goldens: list[float] = []
    forward_time(model, x1)  # warm-up
    forward_time(model, x1)
    for flat in (True, False):
        mode = "flat buffer" if flat else "in place"
        t_enter = clock()
        with qfi.weights(model, "fp32", flat=flat) as w:
            enter = clock() - t_enter
            ratios: dict[float, list[float]] = {b: [] for b in plan.trials}
            times: dict[float, list[float]] = {b: [] for b in plan.trials}
            flips: dict[float, list[int]] = {b: [] for b in plan.trials}
            for _ in range(plan.rounds):
                gold = forward_time(model, x1)
                goldens.append(gold)
                for ber, n in plan.trials.items():
                    tr = trial_time(w, qfi.BitFlip(ber=ber), n, g, flips[ber])
                    times[ber].append(tr)
                    ratios[ber].append(tr / gold)
            for ber in plan.trials:
                mb = statistics.mean(flips[ber]) * 12 / 1e6  # per flipped word: int64 index + int32 old word
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

    def copy_restore() -> None:  # baseline (a): clone everything, flip some bits, copy back
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            for p in params[::7]:
                p.view(-1).view(torch.int32)[:50] ^= 1 << 30
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)

    rows.append(
        ("baseline (a) full copy-restore", med(copy_restore, plan.reps), None, "clone all + copy back")
    )
    block = model.encoder.layers[0]
    n_block = sum(p.numel() for p in block.parameters())
    gd = torch.Generator(device=DEVICE).manual_seed(0)
    tb = med(lambda: dense_block_trial(block, 1e-6, gd), plan.dense_reps)
    rows.append(
        (
            "baseline (b) dense per-bit masks (extrap.)",
            tb * n_params / n_block,
            None,
            f"1 block {tb:.2f} s x {n_params / n_block:.1f}",
        )
    )

    print(
        f"\n{plan.label}, {n_params:,} parameters, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {DEVICE}\n"
    )
    print(f"{'weight-fault trial (fp32, all weights)':46s} {'time':>11s} {'/ golden':>10s}  notes")
    for name, t, ratio, note in rows:
        r = t / golden if ratio is None else ratio
        print(f"{name:46s} {t * 1e3:9.3f}ms {100 * r:9.4f}%  {note}")
    print(
        "qfi rows: median over rounds of (median trial time / that round's golden forward);"
        " other rows: time / median golden forward"
    )


class _Tap(nn.Module):
    """Returns the recorded output ``i``, as the module that produced it did (a fresh tensor
    that is neither an input nor a tensor attribute, so the hooks may quantize it in place)."""

    def __init__(self, outs: list[Tensor], i: int) -> None:
        super().__init__()
        self.outs, self.i = outs, i

    def forward(self, x: Tensor) -> Tensor:
        return self.outs[self.i]


class _Replay(nn.Module):
    """Replays the recorded outputs of one forward through one leaf module each: a session on it
    runs exactly the hooks' work on real activations, without the model's own arithmetic."""

    def __init__(self, outs: list[Tensor]) -> None:
        super().__init__()
        self.taps = nn.ModuleList(_Tap(outs, i) for i in range(len(outs)))

    def forward(self, x: Tensor) -> Tensor:
        for tap in self.taps:
            tap(x)
        return x


def bench_activations(model: VisionTransformer, x1: Tensor, plan: Plan) -> None:
    """Activation emulation on the ViT: batch forward, every nn.Linear output quantized, a fault armed."""
    x = torch.randn(plan.batch, *x1.shape[1:], device=x1.device)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]  # mlp.0, mlp.3, heads.head
    head = f"activation emulation, batch {plan.batch}, {len(linears)} nn.Linear outputs"
    emulation_table(head, model, x, linears, ("fp16", "bf16", "int8"), x1, plan)


class ConvNet(nn.Module):
    """Nine 3x3 convolutions (3 -> c, then c -> c) with ReLUs and a linear head: the large
    feature maps of a CNN (batch 64 at 64x64: 8.4M floats, 32 MiB, per convolution output)."""

    def __init__(self, c: int = 32, convs: int = 9, classes: int = 10) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else c, c, 3, padding=1) for i in range(convs))
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x.mean((2, 3)))


def bench_conv(plan: Plan) -> None:
    """Activation emulation on a CNN's feature maps: every convolution output in fp32 (faults
    flipped in place), fp16, bf16 and int8, BitFlip(1e-7) armed."""
    torch.manual_seed(0)
    batch, size = plan.conv
    model = ConvNet().eval().to(DEVICE)
    x = torch.randn(batch, 3, size, size, device=DEVICE)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    head = f"conv feature maps, batch {batch} at {size}x{size}, {len(convs)} conv outputs"
    emulation_table(head, model, x, convs, ("fp32", "fp16", "bf16", "int8"), x[:2], plan)


def dense_model(plan: Plan) -> tuple[str, nn.Module, dict[str, Tensor] | Tensor]:
    """The real 22.6M-weight text transformer (all-MiniLM-L6-v2, 47 sentences) when the
    ``minilm`` extra is installed, else (and for --smoke) the plan's ViT on a batch of 8."""
    if plan.label.startswith("ViT-B"):
        try:
            import importlib
            import sys
            from pathlib import Path

            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
            tt = importlib.import_module("text_transformer")
            model = tt.minilm()
            return "all-MiniLM-L6-v2, 47 sentences", model, tt.sentences(47)
        except (ImportError, QfiError) as e:  # the hf / minilm extras are optional
            print(f"(all-MiniLM-L6-v2 unavailable: {e}; the plan's ViT instead)")
    model = plan.model().eval()
    return f"{plan.label}, batch 8", model, torch.randn(8, 3, model.image_size, model.image_size)


def bench_dense(plan: Plan) -> None:
    """Dense weight faults: fp32 BitFlip trials (inject + undo) at BER 1e-4 .. 1e-2 over every
    weight, against one copy of all the selected weights and against the model's forward."""
    label, model, batch = dense_model(plan)
    model = model.to(DEVICE)
    batch = {k: v.to(DEVICE) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(DEVICE)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)

    def forward() -> None:
        with torch.no_grad():
            model(**batch) if isinstance(batch, dict) else model(batch)

    copies = [torch.empty_like(p) for p in params]

    def copy_all() -> None:  # one plain copy of every selected weight, into buffers made once
        with torch.no_grad():
            for c, p in zip(copies, params, strict=True):
                c.copy_(p)

    bers = (1e-4, 1e-3, 3e-3, 1e-2)
    g = torch.Generator().manual_seed(0)
    rounds = max(1, plan.rounds // 2)
    reps = 5 if plan.rounds > 2 else 1
    times: dict[float, list[float]] = {b: [] for b in bers}
    flips: dict[float, list[int]] = {b: [] for b in bers}
    copy_t, fwd_t = [], []
    with qfi.weights(model, "fp32") as w:
        forward()
        for _ in range(rounds):  # rounds of [forward, copy, trials per BER]: ratios under one load
            fwd_t.append(med(forward, reps))
            copy_t.append(med(copy_all, reps))
            for ber in bers:
                fault = qfi.BitFlip(ber=ber)
                with w.inject(fault, generator=g):  # warm-up: the first trial at a size maps new pages
                    pass
                times[ber].append(trial_time(w, fault, reps, g, flips[ber]))
    c, f = statistics.median(copy_t), statistics.median(fwd_t)
    print(f"\ndense weight faults, fp32, all {n:,} weights of {label}")
    print(f"one copy of all the weights {c * 1e3:.1f} ms; forward {f * 1e3:.1f} ms")
    print(f"{'BER':>8s} {'mean flips':>11s} {'trial':>10s} {'/ copy':>8s} {'/ forward':>10s}")
    for ber in bers:
        tr = statistics.median(times[ber])
        k = statistics.mean(flips[ber])
        print(f"{ber:8.0e} {k:11,.0f} {tr * 1e3:8.1f}ms {tr / c:7.2f}x {100 * tr / f:9.1f}%")
    print("trial: apply (sampling, grouping by word, gather-XOR-scatter) and undo, median after a warm-up")


def emulation_table(
    head: str, model: nn.Module, x: Tensor, modules: list[str], formats: Sequence[str], calib: Tensor,
    plan: Plan,
) -> None:
    """One row per format: the forward with ``modules``' outputs emulated (a fault armed) against
    the golden forward, end to end and as the hooks' own work."""
    import copy

    names = [f"re:^{re.escape(n)}$" for n in modules]
    fault = qfi.BitFlip(ber=1e-7)
    print(f"\n{head:46s} {'golden':>9s} {'emulated':>9s} {'overhead':>9s} {'hook work':>10s}")
    # the outputs of one forward, replayed to time the hooks' own work apart from the model
    outs: list[Tensor] = []
    mods = dict(model.named_modules())
    rec = [mods[n].register_forward_hook(lambda _m, _i, o: outs.append(o)) for n in modules]
    forward_time(model, x)
    for h in rec:
        h.remove()
    golden = copy.deepcopy(model)  # never hooked: the golden forward runs no session code at all
    probe = torch.zeros(1, device=x.device)
    for fmt in formats:
        # golden and emulated forwards alternate, so that load drift hits both alike; the session
        # is entered once (as a campaign does), the first pair is a warm-up
        gold_t, emu_t = [], []
        with qfi.activations(model, fmt, names=names, calibrate=[calib]) as act, act.inject(fault, seed=0):
            for i in range(plan.pairs + 1):
                g = forward_time(golden, x)
                e = forward_time(model, x)
                if i:
                    gold_t.append(g)
                    emu_t.append(e)
        replay = _Replay([o.clone() for o in outs])  # a fresh copy per format: faults land in it
        bare = med(lambda replay=replay: replay(probe), plan.reps)
        with qfi.activations(replay, fmt, calibrate=[probe]) as act, act.inject(fault, seed=0):
            work = med(lambda replay=replay: replay(probe), plan.reps) - bare
        g8, e8 = statistics.median(gold_t), statistics.median(emu_t)
        paired = statistics.median(e / g - 1 for e, g in zip(emu_t, gold_t, strict=True))
        print(
            f"{fmt + ' outputs, BitFlip(1e-7) armed':46s} {g8 * 1e3:7.1f}ms {e8 * 1e3:7.1f}ms "
            f"{100 * paired:8.2f}% {100 * work / g8:9.2f}%"
        )
    print(
        "overhead: end to end, median over pairs of alternating golden (an unhooked copy) and emulated"
        " forwards (noisy under load);"
        " hook work: the hooks run on the recorded outputs alone, as a share of the golden forward"
    )


def bench_formats(model: VisionTransformer, x1: Tensor, plan: Plan, formats: list[str]) -> None:
    """One weight-fault trial at BER 1e-6 over every stored bit of all weights, per format.  Each
    format gets its own copy of the model and session, all entered at once, so that every round
    times [a golden forward, the trials] of every format under the same load; the ratio to the
    first format is taken within each round, then the median over rounds."""
    import contextlib
    import copy

    ber = 1e-6
    n = plan.trials[ber]
    g = torch.Generator().manual_seed(0)
    n_params = sum(p.numel() for p in model.parameters())
    fault = qfi.BitFlip(ber=ber)
    with contextlib.ExitStack() as stack:
        sessions, enter = {}, {}
        for fmt in formats:
            m = model if fmt == formats[0] else copy.deepcopy(model)
            t = clock()
            sessions[fmt] = (m, stack.enter_context(qfi.weights(m, fmt)))
            enter[fmt] = clock() - t
        times: dict[str, list[float]] = {f: [] for f in formats}
        ratios: dict[str, list[float]] = {f: [] for f in formats}
        rel: dict[str, list[float]] = {f: [] for f in formats}
        flips: dict[str, list[int]] = {f: [] for f in formats}
        scale_rows = dict.fromkeys(formats, 0)
        for _ in range(plan.rounds):
            for fmt in formats:
                m, w = sessions[fmt]
                gold = forward_time(m, x1)

                def count_scale_rows(log: qfi.FaultLog, fmt: str = fmt, w: qfi.WeightSession = w) -> None:
                    scale_rows[fmt] += int((log.name_id >= len(w.names)).sum())

                tr = trial_time(w, fault, n, g, flips[fmt], count_scale_rows)
                times[fmt].append(tr)
                ratios[fmt].append(tr / gold)
            for fmt in formats:
                rel[fmt].append(times[fmt][-1] / times[formats[0]][-1])
        bpv = {f: sessions[f][1].total_bits / n_params for f in formats}
    print(f"\nweight-fault trial per format, BER {ber:g}, all stored bits, flat buffer, {n_params:,} weights")
    vs = "vs " + formats[0]
    print(f"{'format':14s} {'bits/value':>10s} {'trial':>11s} {'/ golden':>10s} {vs:>10s}  notes")
    for f in formats:
        share = scale_rows[f] / max(sum(flips[f]), 1)
        print(f"{f:14s} {bpv[f]:10.4f} {statistics.median(times[f]) * 1e3:9.3f}ms "
              f"{100 * statistics.median(ratios[f]):9.4f}% {statistics.median(rel[f]):9.2f}x  mean flips "
              f"{statistics.mean(flips[f]):.1f}, {100 * share:.1f}% in scale words, "
              f"session enter {enter[f]:.2f} s")
    print("trial: median over rounds of the median trial time; vs: median over rounds of (trial time / the "
          "first format's in the same round)")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repetitions")
    size.add_argument("--smoke", action="store_true", help="a tiny ViT, every measurement once (seconds)")
    ap.add_argument("--only", choices=("weights", "activations", "conv", "dense", "formats"), default=None,
                    help="run one part (formats: only the --format table)")
    ap.add_argument("--format", default=None,
                    help="comma-separated formats for a per-format weight-trial table at BER 1e-6 "
                         "(e.g. int8,mxfp4,nvfp4; ratios to the first)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]; timings synchronize")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="qfi.keep_freed_memory() first, as the qfi CLI does (default: the allocator as is)")
    args = ap.parse_args(argv)
    if args.keep_freed_memory:
        print(f"qfi.keep_freed_memory(): {qfi.keep_freed_memory()}")
    global DEVICE
    DEVICE = torch.device(args.device)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = plan.model().eval().to(DEVICE)
    x1 = torch.randn(1, 3, model.image_size, model.image_size, device=DEVICE)
    if args.only is None or args.only == "weights":
        bench_weights(model, x1, plan)
    if args.only is None or args.only == "activations":
        bench_activations(model, x1, plan)
    if args.only is None or args.only == "conv":
        bench_conv(plan)
    if args.only is None or args.only == "dense":
        bench_dense(plan)
    if args.format or args.only == "formats":
        formats = [f.strip() for f in (args.format or "int8,mxfp4").split(",") if f.strip()]
        bench_formats(model, x1, plan, formats)


if __name__ == "__main__":
    main()
