"""Metric plug-ins and batches of any shape: dict / tuple / tensor inputs, with or without targets;
top1, cosine, loss, perplexity and module:callable metrics, checked against direct computations;
campaigns writing the metric's columns, summaries and plots."""

import math
import textwrap
from collections import OrderedDict

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qfi.campaign import run_campaign
from qfi.config import CampaignConfig
from qfi.errors import QfiError
from qfi.evaluate import Evaluator
from qfi.metrics import get_metric

VOCAB, T, H = 50, 6, 16


class FakeModelOutput(OrderedDict):
    """What HF's ModelOutput is to qfi: an OrderedDict subclass with attribute access."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None


class TinyLM(nn.Module):
    """Keyword inputs (input_ids, attention_mask, labels), a ModelOutput-like dict out: the
    shape of an HF causal LM, small enough for a unit test."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, H)
        self.block = nn.Linear(H, H)
        self.head = nn.Linear(H, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = torch.tanh(self.block(self.embed(input_ids)))
        logits = self.head(h)
        out = FakeModelOutput()
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:])
        out["logits"] = logits
        out["last_hidden_state"] = h
        return out


def _texts(n=40, labels=False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    items = [{"input_ids": ids[i], "attention_mask": torch.ones(T, dtype=torch.long)} for i in range(n)]
    if labels:
        for d in items:
            d["labels"] = d["input_ids"].clone()
    return items


def test_metric_specs_and_errors():
    """Names and ?options parse; unknown names, options and bad values are errors naming them."""
    assert get_metric("cosine?threshold=0.9").threshold == 0.9
    assert get_metric("perplexity").primary == "perplexity"
    with pytest.raises(QfiError, match=r"unknown metric 'top2'; allowed: top1, cosine, loss, perplexity"):
        get_metric("top2")
    with pytest.raises(QfiError, match=r"metric 'cosine' has no option\(s\) \['thresh'\]"):
        get_metric("cosine?thresh=0.9")
    with pytest.raises(QfiError, match=r"threshold 2\.0 is outside \[-1, 1\]"):
        get_metric("cosine?threshold=2")
    with pytest.raises(QfiError, match="cannot import metric 'no_such_mod:fn'"):
        get_metric("no_such_mod:fn")
    with pytest.raises(QfiError, match="unknown metric"):
        CampaignConfig(metric="top3")


def test_top1_needs_targets_and_says_what_to_use():
    """Data without targets cannot be scored by accuracy: the error points at cosine."""
    with pytest.raises(QfiError, match="metric 'top1' needs targets.*cosine"):
        Evaluator(_texts(), batch_size=8)


def test_dict_batches_with_cosine_against_a_direct_computation():
    """Dict inputs reach the model as keyword arguments; cos_mean/cos_min equal torch's cosine of
    the per-sample flattened logits; SDC counts samples under the threshold."""
    model = TinyLM().eval()
    ev = Evaluator(_texts(), batch_size=16, metric="cosine?threshold=0.999")
    golden = ev(model)
    assert golden.values() == {"cos_mean": 1.0, "cos_min": 1.0} and golden.due == 0
    ref_logits = torch.cat([model(**x)["logits"] for x, _, _ in ev.batches]).detach()
    with torch.no_grad():
        model.head.weight.add_(0.05 * torch.randn_like(model.head.weight))
    res = ev(model)
    logits = torch.cat([model(**x)["logits"] for x, _, _ in ev.batches]).detach()
    cos = F.cosine_similarity(logits.reshape(40, -1), ref_logits.reshape(40, -1), dim=1)
    v = res.values(golden)
    assert v["cos_mean"] == pytest.approx(float(cos.mean()), rel=1e-6)
    assert v["cos_min"] == pytest.approx(float(cos.min()), rel=1e-6)
    assert res.sdc(golden) == pytest.approx(float((cos < 0.999).float().mean()))
    assert 0 < res.sdc(golden) <= 1


def test_loss_uses_the_models_own_loss_or_cross_entropy():
    """loss = the output's own loss when the model gets labels; else next-token cross-entropy of
    3-D logits against the targets; perplexity = exp(loss)."""
    model = TinyLM().eval()
    own = Evaluator(_texts(labels=True), batch_size=40, metric="loss")(model)
    x = {k: torch.stack([d[k] for d in _texts(labels=True)]) for k in ("input_ids", "labels")}
    with torch.no_grad():
        direct = float(model(x["input_ids"], labels=x["labels"])["loss"])
    assert own.values()["loss"] == pytest.approx(direct, rel=1e-6)
    # no own loss: (inputs, target) tuples, target = next tokens
    ids = x["input_ids"]
    pairs = [(ids[i], ids[i]) for i in range(40)]
    ce = Evaluator(pairs, batch_size=40, metric="perplexity")(lambda_model(model))
    assert ce.values()["loss"] == pytest.approx(direct, rel=1e-5)
    assert ce.values()["perplexity"] == pytest.approx(math.exp(direct), rel=1e-5)


class lambda_model(nn.Module):  # noqa: N801 - a tiny adapter
    """Positional input_ids, plain logits out (no own loss)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids)["logits"]


def test_due_is_detected_in_any_floating_tensor_of_the_output():
    """A NaN in a secondary output tensor makes that sample DUE, whatever the metric."""

    class Half(nn.Module):
        def forward(self, x):
            aux = torch.zeros_like(x)
            aux[0] = float("nan")
            return {"logits": x * 2, "aux": aux}

    data = [(torch.randn(3), torch.tensor(1)) for _ in range(4)]
    for metric in ("top1", "cosine", "loss"):
        assert Evaluator(data, batch_size=4, metric=metric)(Half()).due == 0.25


PLUGIN = textwrap.dedent(
    """
    import torch

    def mse_to_zero(outputs, targets, scale="1"):
        x = torch.cat([o["logits"] for o in outputs])
        return {"mse": float((x ** 2).mean()) * float(scale), "absmax": float(x.abs().max())}

    mse_to_zero.higher_is_better = False
    """
)


def test_plugin_metric_campaign_writes_its_columns_and_resumes(tmp_path, monkeypatch):
    """A module:callable metric's keys become detail columns (with clean_/golden_ twins), its first
    key the summary's primary value; a finished campaign resumes without re-running anything."""
    (tmp_path / "mymetric.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = CampaignConfig(
        formats=("int8",), ber=(1e-2,), reps=2, device="cpu", metric="mymetric:mse_to_zero?scale=2",
        out=str(tmp_path / "o"),
    )
    res = run_campaign(cfg, model=TinyLM().eval(), dataset=_texts(), progress=False)
    d = res.detail
    assert {"mse", "absmax", "clean_mse", "golden_absmax", "sdc", "due"} <= set(d.columns)
    assert {"mse_mean", "mse_ci_low", "mse_ci_high", "clean_mse"} <= set(res.summary.columns)
    assert (tmp_path / "o" / "per_format.csv").exists()
    again = run_campaign(cfg, model=TinyLM().eval(), dataset=_texts(), progress=False)
    assert again.trials_run == 0 and again.evaluations == 0
    pd.testing.assert_frame_equal(again.detail, d)


def test_text_model_campaign_with_cosine_and_activation_faults(tmp_path):
    """A dict-input, dict-output model through weight and activation campaigns scored by cosine:
    columns, summary CI, the per-BER plot; faults lower the similarity."""
    model = TinyLM().eval()
    for target, names, fmt in (("weights", "block", "bf16"), ("activations", "block", "int8")):
        cfg = CampaignConfig(
            target=target, names=(names,), formats=(fmt,), ber=(1e-4, 1e-2), reps=3, device="cpu",
            metric="cosine", calibrate=16, out=str(tmp_path / target),
        )
        res = run_campaign(cfg, model=model, dataset=_texts(), progress=False)
        s = res.summary.set_index("ber")
        assert {"cos_mean", "cos_min", "clean_cos_mean", "golden_cos_mean"} <= set(res.detail.columns)
        assert (res.detail["golden_cos_mean"] == 1.0).all()
        assert s.loc[1e-2, "cos_mean_mean"] < s.loc[1e-4, "cos_mean_mean"] <= 1.0
        assert s.loc[1e-2, "cos_mean_ci_low"] <= s.loc[1e-2, "cos_mean_mean"]
        assert (tmp_path / target / "per_format.png").exists()
