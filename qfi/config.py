"""The campaign configuration: one frozen dataclass, the single source of truth.

The CLI flags and the keys of a YAML campaign file both become a :class:`CampaignConfig`;
``__post_init__`` validates every field and names the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qfi.errors import QfiError
from quant_schemes import FormatError, get_format

TARGETS = ("weights", "activations")
EXECUTORS = ("local", "ray")
POLICIES = ("trial", "batch", "inference")


def parse_bers(spec: str | float | list | tuple) -> tuple[float, ...]:
    """BER list from ``"1e-6"``, ``"1e-7,1e-5"``, decades ``"1e-10:1e-6"`` or ``"1e-8:1e-4:2"``.

    ``a:b`` gives every decade from a to b (both ends included); ``a:b:k`` gives k log-spaced
    points per decade.
    """
    if isinstance(spec, (int, float)):
        return (float(spec),)
    if isinstance(spec, (list, tuple)):
        out: list[float] = []
        for s in spec:
            out.extend(parse_bers(s))
        return tuple(out)
    text = str(spec).strip()
    if "," in text:
        return parse_bers([t for t in text.split(",") if t.strip()])
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3):
                raise ValueError
            lo, hi = float(parts[0]), float(parts[1])
            per = int(parts[2]) if len(parts) == 3 else 1
            if lo <= 0 or hi <= 0 or hi < lo or per < 1:
                raise ValueError
            a, b = math.log10(lo), math.log10(hi)
            steps = round((b - a) * per)
            return tuple(float(f"{10 ** (a + i / per):.6g}") for i in range(steps + 1))
        return (float(text),)
    except ValueError:
        raise QfiError(
            f"bad BER spec {spec!r}; allowed: a number in [0, 1] ('1e-6'), a list ('1e-7,1e-5'), "
            "decades 'lo:hi' ('1e-10:1e-6') or 'lo:hi:points_per_decade' ('1e-8:1e-4:2')"
        ) from None


def parse_bits(spec: str | int | list | tuple | None, nbits: int) -> tuple[int, ...]:
    """Bit positions for one format: ``"none"`` -> ``(-1,)`` (every bit may flip), ``"all"`` -> each
    position separately, ``"30"``, ``"0:7"`` (inclusive), ``"23,30,31"``."""
    if spec is None:
        return (-1,)
    if isinstance(spec, int):
        bits: list[int] = [spec]
    elif isinstance(spec, (list, tuple)):
        bits = [b for s in spec for b in parse_bits(s, nbits)]
    else:
        text = str(spec).strip().lower()
        if text in ("none", "", "any"):
            return (-1,)
        if text == "all":
            return tuple(range(nbits))
        bits = []
        allowed = "allowed: 'none' (any bit), 'all' (each position), '30', '0:7' (inclusive), '23,30,31'"
        try:
            for part in text.split(","):
                if ":" in part:
                    lo, hi = (int(p) for p in part.split(":"))
                    if hi < lo:
                        raise QfiError(
                            f"bit range {part.strip()!r} is reversed (it would select no bit); "
                            f"write it low:high, e.g. '{hi}:{lo}'"
                        )
                    bits.extend(range(lo, hi + 1))
                else:
                    bits.append(int(part))
        except QfiError:
            raise
        except ValueError:
            raise QfiError(f"bad bit spec {spec!r}; {allowed}") from None
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int):
            raise QfiError(f"bit {b!r} must be an integer position (bit 0 is the LSB)")
        if not 0 <= b < nbits:
            raise QfiError(
                f"bit {b} is outside the format: allowed 0..{nbits - 1} (bit 0 is the LSB; "
                "'none' lets any bit flip)"
            )
    return tuple(bits)


def _int(key: str, value: Any) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if not ok:
        raise QfiError(f"{key} {value!r} must be an integer")
    return int(value)


def _unique(values: Any) -> tuple:
    """``values`` in order, repeats dropped."""
    return tuple(dict.fromkeys(values))


def _tuple(value: Any, kind: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return (
            tuple(v.strip() for v in value.split(";"))
            if kind == "names"
            else tuple(v.strip() for v in value.split(",") if v.strip())
        )
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


@dataclass(frozen=True)
class CampaignConfig:
    """Formats x name groups x bit positions x (BERs | flip counts) x repetitions.

    ``names`` is a tuple of name groups, each a filter string (``"mlp,ln"``: any name containing
    ``mlp`` or ``ln``; ``""``: everything).  ``bits`` is ``"none"`` (every bit of a code may flip
    at the BER), ``"all"`` (one condition per bit position, only that bit flips: the per-bit
    sweep), or explicit positions ``"30"``, ``"0:7"``, ``"23,30,31"``.  ``flips`` adds conditions
    with an exact number of flips (at the chosen bit) instead of a rate.

    A golden or clean baseline with non-finite outputs stops the campaign (naming the tensor or
    module that holds them) unless ``allow_nonfinite`` is true.

    For ``target="activations"`` the int scales are calibrated once on ``calibrate`` samples and
    then frozen, unless ``dynamic`` computes them on every forward.  The calibration samples come
    from ``calibrate_data`` (a data spec, e.g. ``imagefolder:<train dir>``) when given, else from
    the training split of the embedded digits, else from the first evaluation samples (which then
    also score the trials: fine for relative comparisons, optimistic for absolute accuracy).
    ``metric`` scores each pass (``qfi.metrics``): ``top1`` (default), ``cosine`` (drift of the
    outputs against clean; options ``cosine?threshold=0.95&key=pooler_output``), ``loss``,
    ``perplexity``, or a ``module:callable`` plug-in.
    ``executor="ray"`` runs the trials on ``workers`` Ray actors (a local Ray instance, or the
    cluster at ``address``), each with ``threads`` CPU threads (and one GPU where there are
    GPUs); the rows are the same as with the default ``local`` executor.
    ``part`` chooses the stored words faults hit in formats that store more than codes (block and
    group formats: ``codes``, ``scales``, ``zero_points``; default ``all``: every stored bit at
    one BER, as a memory sees them); per-bit sweeps of such formats name one part.
    ``policy`` says when a trial's fault is drawn: ``trial`` (once, held over every batch: a
    permanent fault for the run; for activations each forward draws from the trial's generator),
    ``batch`` (a new draw for every evaluation batch, seeded by ``batch_seed(trial seed, batch)``
    so each can be replayed alone) or ``inference`` (the same with batches of one sample: one
    fault draw per inference, the transient single-event-upset model).
    ``stuck_at`` (0 or 1) makes every condition's sites stuck at that value instead of flipped
    (``qfi.StuckAt`` with the condition's BER or count and bits): a site that already holds the
    value changes nothing, so ``flips`` counts the bits that changed.
    ``bn_stats`` adds the running statistics of BatchNorm layers to the selectable weights (left
    out by default: quantized hardware folds them into the convolutions; see ``qfi.qerror``).
    ``output_key`` chooses which floating tensor of a module output carries the faults (a key of a
    dict / ``ModelOutput``, a dataclass field, an index or a dotted path; default: the first).

    ``model_args`` / ``data_args`` are keyword arguments of a ``module:callable`` model or data
    factory (also inline: ``mypkg.nets:make?depth=6``); ``resize``, ``channels`` and ``class_map``
    are image-folder options (``qfi.zoo.load_data``).

    ``ci`` turns on sequential stopping: a condition runs ``reps_min`` repetitions, then one more
    at a time until the 95% CI half-width of its primary value is at most ``ci``, or ``reps_max``
    (default ``reps``) are done; its trials are a prefix of the fixed-repetition trials (same
    seeds, same resume).  Caveat: stopping on the observed spread makes the reported intervals
    somewhat optimistic (their coverage is below 95%); keep ``reps_min`` >= 3 and report the
    repetitions used (``trials`` in summary.csv).

    ``prefix_reuse`` serves the part of each trial's forward that comes before the first fault
    from clean activations cached per name group (``qfi.prefix``), at most ``cache_mb`` MiB of
    them (default 512); the rows are the same, so neither is part of a campaign's identity.

    Repeated formats, BERs, flip counts and name groups are dropped (a condition runs once).
    """

    model: str = "vit_digits"
    model_args: dict[str, Any] | None = None
    weights: str | None = None
    data: str | None = None
    data_args: dict[str, Any] | None = None
    image_size: int | None = None
    resize: int | None = None
    channels: int | None = None
    class_map: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    target: str = "weights"
    formats: tuple[str, ...] = ("fp32",)
    ber: tuple[float, ...] = (1e-6,)
    flips: tuple[int, ...] = ()
    bits: str = "none"
    part: str = "all"
    names: tuple[str, ...] = ("",)
    exclude: str = ""
    reps: int = 10
    ci: float | None = None
    reps_min: int = 3
    reps_max: int | None = None
    seed: int = 0
    batch_size: int = 512
    limit: int | None = None
    device: str = "auto"
    calibrate: int = 256
    calibrate_data: str | None = None
    dynamic: bool = False
    output_key: str | None = None
    observe: str | None = None
    metric: str = "top1"
    bn_stats: bool = False
    allow_nonfinite: bool = False
    executor: str = "local"
    workers: int | None = None
    address: str | None = None
    threads: int = 1
    policy: str = "trial"
    stuck_at: int | None = None
    prefix_reuse: bool = False
    cache_mb: int | None = None
    out: str = "qfi-results"

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass normalisation
        set_("formats", _tuple(self.formats, "formats"))
        set_("names", _unique(str(n).strip() for n in _tuple(self.names, "names")) or ("",))
        set_("ber", _unique(parse_bers(self.ber)) if self.ber not in (None, (), [], "") else ())
        try:
            set_("flips", _unique(int(f) for f in _tuple(self.flips, "flips")))
        except ValueError:
            raise QfiError(f"bad flip counts {self.flips!r}; allowed: integers >= 0, e.g. 1,10") from None
        set_("bits", "none" if self.bits is None else str(self.bits))
        for k in ("reps", "reps_min", "reps_max", "seed", "batch_size", "limit", "calibrate", "image_size",
                  "resize", "channels"):
            v = getattr(self, k)
            if v is None and k in ("limit", "image_size", "resize", "channels", "reps_max"):
                continue
            set_(k, _int(k, v))
        for k in ("model_args", "data_args"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, dict) and all(isinstance(a, str) for a in v)):
                raise QfiError(f"{k} {v!r} must be a mapping of argument names to values, e.g. {{depth: 6}}")
            if v == {}:
                set_(k, None)
        if self.class_map is not None and not isinstance(self.class_map, str):
            raise QfiError(f"class_map {self.class_map!r} must be a path to a JSON or text file")
        if self.channels is not None and self.channels not in (1, 3):
            raise QfiError(f"channels {self.channels} must be 1 (grayscale) or 3 (RGB)")
        for k in ("dynamic", "bn_stats", "allow_nonfinite", "prefix_reuse"):
            if not isinstance(getattr(self, k), bool):
                raise QfiError(f"{k} {getattr(self, k)!r} must be true or false")
        for k in ("model", "exclude", "device", "out"):
            if not isinstance(getattr(self, k), str):
                raise QfiError(f"{k} {getattr(self, k)!r} must be a string")
        for k in ("mean", "std"):
            v = getattr(self, k)
            if v is not None:
                try:
                    set_(k, tuple(float(x) for x in _tuple(v, k)))
                except ValueError:
                    raise QfiError(
                        f"{k} {v!r} must be numbers, one per channel, e.g. 0.485,0.456,0.406"
                    ) from None
        if self.target not in TARGETS:
            raise QfiError(f"unknown target {self.target!r}; allowed: {', '.join(TARGETS)}")
        if not self.formats:
            raise QfiError("no format given; e.g. formats: [fp32, fp16, bf16, q3.13, int8]")
        from quant_schemes import part_bits, stored_parts

        parts = ("all", "codes", "scales", "zero_points")
        if self.part not in parts:
            raise QfiError(f"part {self.part!r}; allowed: {', '.join(parts)} (which stored words faults hit)")
        canonical = []
        for name in self.formats:
            try:
                fmt = get_format(str(name))
            except FormatError as e:
                raise QfiError(str(e)) from None
            has = stored_parts(fmt)
            if self.part not in ("all", "codes") and self.part not in has:
                raise QfiError(f"format {fmt.name!r} stores no {self.part}; its parts are {', '.join(has)}")
            per_bit = str(self.bits).strip().lower() not in ("none", "any", "")
            if self.part == "all" and len(has) > 1 and per_bit:
                raise QfiError(
                    f"a per-bit sweep of {fmt.name!r} needs part 'codes' or 'scales' (--part): a bit number "
                    "names a position in one kind of stored word"
                )
            parse_bits(self.bits, part_bits(fmt, "codes" if self.part == "all" else self.part))
            canonical.append(fmt.name)
        set_("formats", _unique(canonical))
        for p in self.ber:
            if not (0.0 <= p <= 1.0) or math.isnan(p):
                raise QfiError(f"BER {p!r} is outside [0, 1]")
        for f in self.flips:
            if f < 0:
                raise QfiError(f"flip count {f} is negative; allowed: integers >= 0")
        if not self.ber and not self.flips:
            raise QfiError("nothing to sweep: give at least one BER (ber) or flip count (flips)")
        if self.reps < 1:
            raise QfiError(f"reps {self.reps} must be >= 1")
        if self.ci is not None:
            try:
                set_("ci", float(self.ci))
            except (TypeError, ValueError):
                raise QfiError(f"ci {self.ci!r} must be a number: the target 95% CI half-width") from None
            if not (self.ci > 0) or math.isinf(self.ci):
                raise QfiError(f"ci {self.ci} must be a positive half-width, e.g. 0.01 (one point of top-1)")
            if self.reps_min < 2:
                raise QfiError(f"reps_min {self.reps_min} must be >= 2 (a CI needs two repetitions)")
            if self.max_reps < self.reps_min:
                raise QfiError(f"reps_max {self.max_reps} is below reps_min {self.reps_min}")
        elif self.reps_max is not None or self.reps_min != 3:
            raise QfiError("reps_min and reps_max apply with ci (sequential stopping): add --ci <half-width>")
        if self.batch_size < 1:
            raise QfiError(f"batch_size {self.batch_size} must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise QfiError(f"limit {self.limit} must be >= 1 (or null for the whole dataset)")
        if self.calibrate < 1:
            raise QfiError(f"calibrate {self.calibrate} must be >= 1 (samples for activation scales)")
        if self.output_key is not None:
            if isinstance(self.output_key, bool) or not isinstance(self.output_key, (str, int)):
                raise QfiError(f"output_key {self.output_key!r} must be a key, field name or index")
            set_("output_key", str(self.output_key))
            if self.target != "activations":
                raise QfiError("output_key applies to target 'activations' only (a module output's tensor)")
        if self.observe is not None and not isinstance(self.observe, str):
            raise QfiError(
                f"observe {self.observe!r} must be a module name filter ('' for every leaf module)"
            )
        if not isinstance(self.metric, str):
            raise QfiError(f"metric {self.metric!r} must be a string: 'top1', 'cosine', 'module:fn', ...")
        from qfi.metrics import parse_spec

        name, _ = parse_spec(self.metric)
        if ":" not in name:  # a built-in: options checked now; plug-ins are imported when the run starts
            from qfi.metrics import get_metric

            get_metric(self.metric)
        if self.executor not in EXECUTORS:
            raise QfiError(f"unknown executor {self.executor!r}; allowed: {', '.join(EXECUTORS)}")
        for k in ("workers", "threads"):
            v = getattr(self, k)
            if v is not None:
                set_(k, _int(k, v))
                if getattr(self, k) < 1:
                    raise QfiError(f"{k} {getattr(self, k)} must be >= 1")
        if self.address is not None and not isinstance(self.address, str):
            raise QfiError(f"address {self.address!r} must be a string such as 'ray://head:10001' or 'auto'")
        if self.executor == "local" and (self.workers is not None or self.address is not None):
            raise QfiError("workers and address apply to executor 'ray' only (add --executor ray)")
        if self.cache_mb is not None:
            set_("cache_mb", _int("cache_mb", self.cache_mb))
            if self.cache_mb < 0:
                raise QfiError(f"cache_mb {self.cache_mb} must be >= 0 (MiB of cached activations)")
            if not self.prefix_reuse:
                raise QfiError("cache_mb applies with prefix_reuse (add --prefix-reuse)")
        if self.stuck_at is not None:
            v = self.stuck_at
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) not in (0, 1):
                raise QfiError(f"stuck_at {v!r}: allowed are 0, 1 (or null: bit flips)")
            set_("stuck_at", int(v))
        if self.policy not in POLICIES:
            raise QfiError(f"unknown policy {self.policy!r}; allowed: {', '.join(POLICIES)}")
        if self.policy == "inference" and self.batch_size != 1:
            raise QfiError(
                f"policy 'inference' (one fault draw per inference) needs batch_size 1, got "
                f"{self.batch_size}: use --batch-size 1, or policy 'batch' (one draw per batch)"
            )
        if self.policy != "trial" and self.prefix_reuse:
            raise QfiError(f"policy {self.policy!r} draws per batch; prefix_reuse needs policy 'trial'")
        if self.bn_stats and self.target != "weights":
            raise QfiError("bn_stats applies to target 'weights' only (BatchNorm running statistics)")
        if self.dynamic and self.target != "activations":
            raise QfiError("dynamic applies to target 'activations' only (weight scales are per tensor)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CampaignConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QfiError(f"unknown campaign key(s) {unknown}; allowed: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str) -> CampaignConfig:
        """A campaign file (YAML keys = the fields), or a run's ``manifest.json`` (YAML reads
        JSON), whose ``config`` reruns that campaign; its ``out`` is the manifest's own folder
        (so a rerun resumes there), replace it to write elsewhere."""
        import yaml

        if os.path.isdir(path):
            hint = os.path.join(path, "manifest.json")
            more = f" (did you mean {hint}?)" if os.path.isfile(hint) else ""
            raise QfiError(
                f"campaign file {path!r} is a directory; give a .yaml file or a manifest.json{more}"
            )
        try:
            with open(path) as f:
                d = yaml.safe_load(f)
        except FileNotFoundError:
            raise QfiError(f"campaign file {path!r} does not exist") from None
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise QfiError(f"{path}: not valid YAML: {e}") from None
        except OSError as e:
            raise QfiError(f"cannot read campaign file {path!r}: {e.strerror or e}") from None
        if d is None:
            raise QfiError(
                f"{path}: the campaign file is empty; give at least formats and ber "
                "(see examples/campaign.yaml for every key)"
            )
        if not isinstance(d, dict):
            raise QfiError(f"{path}: a campaign file must be a mapping of keys to values")
        if "config" in d and "model_hash" in d:  # a manifest written by run_campaign
            d = dict(d["config"], out=str(Path(path).parent))
        try:
            return cls.from_dict(d)
        except TypeError as e:  # a value of the wrong type, e.g. reps: [1]
            raise QfiError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @property
    def max_reps(self) -> int:
        """Repetitions planned per condition: ``reps``, or ``reps_max`` (default ``reps``) under
        sequential stopping (a condition then runs a prefix of them)."""
        if self.ci is not None and self.reps_max is not None:
            return self.reps_max
        return self.reps

    def identity(self) -> dict[str, Any]:
        """The fields that determine the results (a resumed run must match them)."""
        d = self.to_dict()
        d.pop("out")
        for k in ("allow_nonfinite", "executor", "workers", "address", "threads", "prefix_reuse", "cache_mb"):
            d.pop(k)  # how and where the trials run, not what they compute
        return d
