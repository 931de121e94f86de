"""Prefix reuse (qfi.prefix): campaigns give byte-identical rows with and without it, every case
where exactness cannot be guaranteed falls back (and says so once), the cache stays within its
bound, and the model is left exactly as it was."""

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

import qfi
from qfi import zoo
from qfi.campaign import LocalExecutor, model_hash, run_campaign
from qfi.config import CampaignConfig
from qfi.evaluate import Evaluator
from qfi.prefix import PrefixCache, prefix_cache

LIMIT, BATCH = 96, 32  # three evaluation batches


class PrefixExecutor(LocalExecutor):
    """The local executor with prefix reuse on (or off); keeps each group's cache for the test."""

    def __init__(self, prefix: bool = True, cache_mb: float | None = None) -> None:
        self.prefix, self.cache_mb, self.caches = prefix, cache_mb, {}

    def run(self, ctx, groups, emit):
        ctx.prefix = self.prefix
        if self.cache_mb is not None:
            ctx.cache_mb = self.cache_mb
        for (fmt_name, names), trials in groups:
            with ctx.session(fmt_name, names) as session:
                clean, base = ctx.clean_baseline(session, fmt_name, names)
                for t in trials:
                    emit(ctx.row(session, t, clean, base))
                self.caches[(fmt_name, names)] = ctx.prefix_cache(session, names)
        return 0


def _campaign(tmp_path, tag, model, prefix, dataset=None, cache_mb=None, **kw):
    base = dict(formats=("fp32", "int8"), ber=(1e-2,), flips=(1, 4), reps=2, limit=LIMIT, batch_size=BATCH,
                device="cpu", out=str(tmp_path / tag))
    base.update(kw)
    ex = PrefixExecutor(prefix, cache_mb)
    run_campaign(CampaignConfig(**base), model=model, dataset=dataset, fresh=True, plots=False,
                 progress=False, executor=ex)
    return (tmp_path / tag / "detail.csv").read_bytes(), ex


def _same_rows(tmp_path, model, dataset=None, **kw):
    """detail.csv with prefix reuse == without; returns the caches of the reuse run."""
    plain, _ = _campaign(tmp_path, "plain", model, False, dataset, **kw)
    reused, ex = _campaign(tmp_path, "reused", model, True, dataset, **kw)
    assert reused == plain
    return ex.caches


def _prefix_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefix reuse")]


class Block(nn.Module):
    """Two parallel branches and a residual: act(x + a(x) + b(x))."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.ReLU()

    def forward(self, x):
        return self.act(x + self.a(x) + self.b(x))


class Branchy(nn.Module):
    """stem -> two residual blocks with branches -> pool -> head (8x8 digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(Block(4), Block(4))
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _branchy():
    torch.manual_seed(0)
    return Branchy().eval()


class Tiny(nn.Module):
    """pre -> mid -> post on flattened digits, with optional twists for the fallback cases."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.mid, self.post = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.post(self.mid(self.pre(x.flatten(1))))


def _tiny(cls=Tiny):
    torch.manual_seed(0)
    return cls().eval()


@pytest.fixture(scope="module")
def vit():
    return zoo.load_model("vit_digits")


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator(zoo.load_data("digits"), batch_size=BATCH, limit=LIMIT)


# -- exactness -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target,names,served",
    [
        ("weights", "heads", ["conv_proj", "encoder"]),
        ("weights", "encoder_layer_2", ["conv_proj", "encoder.layers.encoder_layer_0",
                                        "encoder.layers.encoder_layer_1"]),
        ("activations", "heads.head", ["conv_proj", "encoder"]),
        ("activations", "encoder.layers.encoder_layer_2", ["conv_proj", "encoder.layers.encoder_layer_0",
                                                           "encoder.layers.encoder_layer_1"]),
    ],
)
def test_vit_rows_are_byte_identical_with_prefix_reuse(tmp_path, vit, target, names, served):
    """Faults only in the head or the last encoder layer, weights or activations, fp32 and int8,
    rates and flip counts: detail.csv is byte for byte the same with prefix reuse, which served
    the modules before the faults in every batch."""
    caches = _same_rows(tmp_path, vit, target=target, names=(names,))
    for cache in caches.values():
        assert cache.active and cache.served == served
        assert len(cache.batches) == 3 and all(b is not None for b in cache.batches)
        assert cache.hits > 0


@pytest.mark.parametrize("target,names", [("weights", "blocks.1;head"), ("activations", "blocks.1.a;head")])
def test_branches_and_residuals_rows_are_byte_identical(tmp_path, target, names):
    """A model with parallel branches and residual sums: the same rows with prefix reuse."""
    caches = _same_rows(tmp_path, _branchy(), target=target, names=tuple(names.split(";")))
    assert all(c.active and c.hits for c in caches.values())
    assert caches[("fp32", "head")].served == ["stem", "blocks"]


def test_cnn_rows_are_byte_identical(tmp_path):
    """The embedded CNN (functional ReLUs and pooling between modules), faults in fc2."""
    model = zoo.load_model("cnn_digits")
    caches = _same_rows(tmp_path, model, names=("fc2",))
    assert caches[("fp32", "fc2")].served == ["conv1", "conv2", "fc1"]


class KwModel(nn.Module):
    """Keyword inputs (a dict batch) and a module called with a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.post = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x, labels=None):
        return self.post(self.pre(input=x.flatten(1)))


def test_dict_inputs_rows_are_byte_identical(tmp_path):
    """Batches that are dicts of keyword arguments (the HF convention, ``labels`` the target)."""
    data = [{"x": x, "labels": y} for x, y in zoo.load_data("digits")]
    caches = _same_rows(tmp_path, _tiny(KwModel), dataset=data, names=("post",))
    assert all(c.served == ["pre"] and c.hits for c in caches.values())


def test_served_modules_do_not_run(vit, evaluator):
    """During a trial the modules inside a served one are never called; outside a trial the
    evaluation is unchanged and no module keeps a patched forward."""
    inner = vit.get_submodule("encoder.layers.encoder_layer_0.mlp.0")
    calls = []
    h = inner.register_forward_hook(lambda *a: calls.append(1))
    try:
        with qfi.weights(vit, "fp32", names="encoder_layer_2") as s:
            cache = prefix_cache(vit, s, evaluator.inputs())
            calls.clear()
            with s.inject(qfi.FlipCount(count=3), seed=1):
                a, b = evaluator(vit, prefix=cache), evaluator(vit)
    finally:
        h.remove()
    assert len(calls) == 3  # the plain evaluation's 3 batches only
    assert torch.equal(a.record.cat("pred"), b.record.cat("pred"))
    assert not any("forward" in m.__dict__ for m in vit.modules())


def test_the_model_is_bit_identical_after_prefix_reuse(tmp_path, vit):
    """Weights and activations campaigns with reuse leave every tensor bit-identical, no patched
    forward and no hook behind."""
    before = model_hash(vit)
    for target, names in (("weights", "heads"), ("activations", "heads.head")):
        _campaign(tmp_path, target, vit, True, target=target, names=(names,))
    assert model_hash(vit) == before
    for m in vit.modules():
        assert "forward" not in m.__dict__
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_forward_raising_restores_the_model(vit, evaluator):
    """A forward that raises mid-way (an interrupt, a bug in a hook) leaves no patched forward."""
    with qfi.weights(vit, "fp32", names="heads") as s:
        cache = prefix_cache(vit, s, evaluator.inputs())

        def boom(*a):
            raise KeyboardInterrupt

        h = vit.heads.register_forward_pre_hook(boom)
        try:
            with pytest.raises(KeyboardInterrupt):
                evaluator(vit, prefix=cache)
        finally:
            h.remove()
    assert not any("forward" in m.__dict__ for m in vit.modules())


# -- the cache bound -------------------------------------------------------------------------------


def test_cache_bound_serves_the_batches_that_fit(tmp_path, vit, evaluator):
    """With room for one batch, one batch is served and the others recomputed (same results);
    cache_mb=0 caches nothing."""
    with qfi.weights(vit, "fp32", names="heads") as s:
        full = prefix_cache(vit, s, evaluator.inputs())
        per_batch = full.nbytes / 3  # 32 samples each
        mb = 1.5 * per_batch / 2**20
        bounded = prefix_cache(vit, s, evaluator.inputs(), cache_mb=mb)
        none = prefix_cache(vit, s, evaluator.inputs(), cache_mb=0)
        with s.inject(qfi.FlipCount(count=2), seed=3):
            ref, got = evaluator(vit), evaluator(vit, prefix=bounded)
    assert 0 < bounded.nbytes <= mb * 2**20
    assert [b is not None for b in bounded.batches] == [True, False, False]
    assert not none.active and none.nbytes == 0
    assert torch.equal(ref.record.cat("pred"), got.record.cat("pred"))
    caches = _same_rows(tmp_path, vit, names=("heads",), cache_mb=mb)
    assert all(c.nbytes <= mb * 2**20 for c in caches.values())


# -- fallbacks ---------------------------------------------------------------------------------------


def _record(model, evaluator, names, caplog):
    with caplog.at_level(logging.WARNING, logger="qfi"), qfi.weights(model, "fp32", names=names) as s:
        return prefix_cache(model, s, evaluator.inputs(), label=f"names {names!r}")


def test_training_mode_turns_reuse_off(vit, evaluator, caplog):
    """A model in training mode: no reuse, one warning naming the module."""
    vit.encoder.train()
    try:
        cache = _record(vit, evaluator, "heads", caplog=caplog)
    finally:
        vit.eval()
    assert not cache.active and "training mode" in cache.reason
    assert _prefix_warnings(caplog) == [
        f"prefix reuse off for names 'heads': {cache.reason}; its trials run the full forward"
    ]


_COUNTER = itertools.count()


class Drift(nn.Module):
    def forward(self, x):
        return x + next(_COUNTER) * 1e-3


class DriftModule(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.drift = Drift()

    def forward(self, x):
        return self.post(self.mid(self.drift(self.pre(x.flatten(1)))))


def test_outputs_that_differ_between_two_clean_runs_turn_reuse_off(evaluator, caplog):
    """A module whose output changes from one clean forward to the next (randomness the RNG
    checks cannot see): the second clean run disagrees, reuse is off, one warning."""
    cache = _record(_tiny(DriftModule), evaluator, "post", caplog=caplog)
    assert not cache.active and "two clean runs" in cache.reason
    assert len(_prefix_warnings(caplog)) == 1


class ModeSensitive(Tiny):
    """``mid`` computes otherwise while a dispatch mode watches (as a kernel choice could)."""

    def forward(self, x):
        h = self.mid(self.pre(x.flatten(1)))
        if _get_current_dispatch_mode() is not None:
            h = h + 1
        return self.post(h)


def test_a_recording_pass_that_computes_otherwise_is_not_used(tmp_path, caplog):
    """The clean baseline doubles as the recording pass; when a plain rerun of its first batch
    disagrees, reuse is off and the clean baseline is computed again without recording, so the
    rows stay those of a campaign without reuse."""
    with caplog.at_level(logging.WARNING, logger="qfi"):
        caches = _same_rows(tmp_path, _tiny(ModeSensitive), names=("post",))
    assert all(not c.active and "the model gives different outputs" in c.reason for c in caches.values())
    assert len(_prefix_warnings(caplog)) == 1


class Noisy(nn.Module):
    def forward(self, x):
        return x + 0 * torch.rand_like(x)


class NoisyModel(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.noise = Noisy()

    def forward(self, x):
        return self.post(self.mid(self.noise(self.pre(x.flatten(1)))))


class SharedAct(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.post(self.act(self.mid(self.act(self.pre(x.flatten(1))))))


class Stateful(nn.Module):
    def forward(self, x):
        self.last = x.sum()
        return x * 2


class StatefulModel(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.keep = nn.Sequential(Stateful())

    def forward(self, x):
        return self.post(self.mid(self.keep(self.pre(x.flatten(1)))))


class InPlaceLater(Tiny):
    def forward(self, x):
        h = self.pre(x.flatten(1))
        h.relu_()
        return self.post(self.mid(h))


class Scale(nn.Module):
    def forward(self, x, *, scale):
        scale.mul_(1.0)  # changes its keyword input in place (the values stay)
        return x * scale


class KwMutates(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.scale = Scale()

    def forward(self, x):
        s = torch.ones(1)
        return self.post(self.mid(self.scale(self.pre(x.flatten(1)), scale=s) + s))


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(64, 16)

    def forward(self, x):
        return {"h": self.pre(x)}


class DictOut(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.hold = Holder()
        del self.pre

    def forward(self, x):
        return self.post(self.mid(self.hold(x.flatten(1))["h"]))


class ReadsEarly(Tiny):
    """The root reads ``post.weight`` through F.linear before ``mid`` runs and ``post`` is called."""

    def forward(self, x):
        h = self.pre(x.flatten(1))
        h = h + F.linear(h, self.post.weight).sum(1, keepdim=True)
        return self.post(self.mid(h))


@pytest.mark.parametrize(
    "cls,names,served,dropped,why",
    [
        (NoisyModel, "post", ["pre", "mid"], "noise", "draws random numbers"),
        (SharedAct, "post", ["pre", "mid"], "act", "is called 2 times in one forward"),
        (StatefulModel, "post", ["pre", "mid"], "keep", "calls 'keep.0', which changes its state"),
        (InPlaceLater, "post", ["mid"], "pre", "changed in place later in the forward"),
        (KwMutates, "post", ["pre", "mid"], "scale", "changes one of its inputs in place"),
        (DictOut, "post", ["hold.pre", "mid"], "hold", "returns a dict, not a tensor"),
    ],
)
def test_each_unsafe_module_runs_in_every_trial_with_one_warning(
    tmp_path, evaluator, caplog, cls, names, served, dropped, why
):
    """A module before the faults that cannot be served exactly (random numbers, called twice,
    a side effect on its or a nested module's state, an output changed in place later, an input
    changed in place, an output that is not a tensor) runs in every trial; the modules around it
    are still served, the rows are the same, and the reason is warned once per campaign (two
    formats, one name group)."""
    cache = _record(_tiny(cls), evaluator, names, caplog=caplog)
    assert cache.active and cache.served == served
    msgs = _prefix_warnings(caplog)
    assert len(msgs) == 1 and f"module {dropped!r} runs in every trial" in msgs[0] and why in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qfi"):
        _same_rows(tmp_path, _tiny(cls), names=(names,))
    assert len(_prefix_warnings(caplog)) == 1  # 2 formats x (with, without): said once


def test_a_selected_weight_read_before_its_module_runs_sets_the_cut(tmp_path, evaluator):
    """The root reads ``post.weight`` (F.linear) before ``mid`` and ``post`` run: only ``pre``
    is served, so a fault in ``post.weight`` reaches everything after the read (rows equal)."""
    model = _tiny(ReadsEarly)
    with qfi.weights(model, "fp32", names="post.weight") as s:
        cache = prefix_cache(model, s, evaluator.inputs())
    assert cache.active and cache.served == ["pre"]
    _same_rows(tmp_path, _tiny(ReadsEarly), names=("post.weight",), formats=("fp32",), bits="30", ber=(),
               flips=(1,))


def test_a_multihead_attention_reading_out_proj_sets_the_cut(vit, evaluator):
    """``out_proj.weight`` is read by its MultiheadAttention parent, never by ``out_proj``'s own
    forward: the cut stops before the first attention, not at a module that never runs."""
    with qfi.weights(vit, "fp32", names="out_proj") as s:
        cache = prefix_cache(vit, s, evaluator.inputs())
        with s.inject(qfi.FlipCount(count=2, bits=30), seed=0):
            a, b = evaluator(vit), evaluator(vit, prefix=cache)
    assert cache.served == ["conv_proj", "encoder.layers.encoder_layer_0.ln_1"]
    assert torch.equal(a.record.cat("pred"), b.record.cat("pred"))


class Spoiler(Tiny):
    """Writes into ``pre``'s output in place, but only when ``post`` returns huge values (a faulty
    run): the clean recording cannot see it, the check after each served batch does."""

    def forward(self, x):
        h = self.pre(x.flatten(1))
        y = self.post(self.mid(h))
        if not bool((y.abs() < 1e6).all()):
            h.zero_()
        return y + h.sum(1, keepdim=True)


def test_a_forward_writing_into_the_cache_turns_reuse_off_and_reruns(tmp_path, evaluator, caplog):
    """The suffix of a faulty trial writes into a cached tensor: reuse goes off for the group for
    good, the trial is rerun with the full forward, the rows are the same, one warning."""
    with caplog.at_level(logging.WARNING, logger="qfi"):
        caches = _same_rows(tmp_path, _tiny(Spoiler), names=("post",), formats=("fp32",), bits="30",
                            ber=(), flips=(1,), reps=3)
    cache = caches[("fp32", "post")]
    assert not cache.active and "changes the cached output of module 'pre' in place" in cache.reason
    assert len(_prefix_warnings(caplog)) == 1


def test_a_compiled_module_turns_reuse_off(evaluator, caplog):
    """A module compiled with torch.compile (an ``OptimizedModule``) runs its own code: no reuse."""

    class OptimizedModule(nn.Module):  # the class name torch.compile gives its wrapper
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, x):
            return self._orig_mod(x)

    model = _tiny()
    model.mid = OptimizedModule(model.mid).eval()
    cache = _record(model, evaluator, "post", caplog=caplog)
    assert not cache.active and "compiled" in cache.reason
    assert len(_prefix_warnings(caplog)) == 1


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_scripted_modules_are_never_served(evaluator):
    """TorchScript modules cannot have their forward swapped: they run; the rest is served."""
    model = _tiny()
    model.mid = torch.jit.script(model.mid)
    with qfi.weights(model, "fp32", names="post") as s:
        cache = prefix_cache(model, s, evaluator.inputs())
        with s.inject(qfi.FlipCount(count=2, bits=30), seed=0):
            a, b = evaluator(model), evaluator(model, prefix=cache)
    assert cache.served == ["pre"]
    assert torch.equal(a.record.cat("pred"), b.record.cat("pred"))


def test_nothing_before_the_first_fault_means_no_reuse_and_no_warning(vit, evaluator, caplog):
    """Faults in the first module (or everywhere): nothing to serve, nothing to warn about."""
    cache = _record(vit, evaluator, "conv_proj", caplog=caplog)
    assert not cache.active and cache.reason is None and not cache.batches
    assert not _prefix_warnings(caplog)


def test_prefix_cache_is_built_on_the_clean_model_only(vit, evaluator):
    """The cache belongs to one session and is dropped when the session ends."""
    cfg = CampaignConfig(names=("heads",), limit=LIMIT, batch_size=BATCH, device="cpu")
    from qfi.campaign import TrialContext

    ctx = TrialContext(cfg, vit, evaluator, [], True, None, {}, prefix=True)
    with ctx.session("fp32", "heads") as s:
        cache = ctx.prefix_cache(s, "heads")
        assert isinstance(cache, PrefixCache) and cache.active
        assert ctx.prefix_cache(s, "heads") is cache
    assert ctx._cache is None
    off = TrialContext(cfg, vit, evaluator, [], True, None, {})
    with off.session("fp32", "heads") as s:
        assert off.prefix_cache(s, "heads") is None


def test_config_and_cli_turn_prefix_reuse_on(tmp_path, vit, caplog):
    """prefix_reuse / cache_mb (YAML keys, --prefix-reuse / --cache-mb) reach the trials and give
    the rows of a campaign without them, leave a campaign's identity alone (a run resumes with or
    without them) and are checked."""
    from qfi.cli import _config, build_parser
    from qfi.errors import QfiError

    a = build_parser().parse_args(["ber", "--prefix-reuse", "--cache-mb", "64"])
    cfg = _config(a, a.format)
    assert cfg.prefix_reuse and cfg.cache_mb == 64
    plain = _config(*(lambda p: (p, p.format))(build_parser().parse_args(["ber"])))
    assert not plain.prefix_reuse and plain.cache_mb is None
    assert cfg.identity() == plain.identity()
    assert CampaignConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(QfiError, match="cache_mb -1 must be >= 0"):
        CampaignConfig(prefix_reuse=True, cache_mb=-1)
    with pytest.raises(QfiError, match="cache_mb applies with prefix_reuse"):
        CampaignConfig(cache_mb=64)
    with pytest.raises(QfiError, match="prefix_reuse 'yes' must be true or false"):
        CampaignConfig(prefix_reuse="yes")
    run = dict(names=("heads",), flips=(1,), reps=3, limit=LIMIT, batch_size=BATCH, device="cpu")
    run_campaign(CampaignConfig(**run, out=str(tmp_path / "off")), model=vit, plots=False, progress=False)
    with caplog.at_level(logging.INFO, logger="qfi"):
        run_campaign(CampaignConfig(**run, prefix_reuse=True, cache_mb=64, out=str(tmp_path / "on")),
                     model=vit, plots=False, progress=False)
    assert (tmp_path / "on" / "detail.csv").read_bytes() == (tmp_path / "off" / "detail.csv").read_bytes()
    assert any("prefix reuse for names 'heads': 2 module(s) served" in r.getMessage() for r in caplog.records)
