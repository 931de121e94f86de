"""Layer-wise vulnerability maps: grouping by block index or module, the one-campaign sweep,
per_layer.csv / per_layer.png and the `qfi layers` command (tiny runs on the embedded ViT)."""

import pandas as pd
import pytest
import torch
from torch import nn

import qfi
from qfi import zoo
from qfi.cli import _Parser
from qfi.config import CampaignConfig
from qfi.errors import QfiError
from qfi.layers import fitted_bers, layer_grids, layer_groups, layer_map, per_layer_table, plot_layer_map
from qfi.layers_cli import add_parser, cmd_layers

VIT_BLOCKS = [
    "class_token",
    "conv_proj",
    "encoder.pos_embedding",
    "encoder.layers.encoder_layer_0",
    "encoder.layers.encoder_layer_1",
    "encoder.layers.encoder_layer_2",
    "encoder.ln",
    "heads",
]
PER_LAYER_COLUMNS = {
    "layer", "order", "numel", "size_bits", "format", "target", "fault", "ber", "count", "bit",
    "bit_name", "trials", "expected_flips", "flips_mean", "top1_mean", "top1_ci_low", "top1_ci_high",
    "top1_drop", "sdc_mean", "due_mean", "clean_top1", "golden_top1",
}  # fmt: skip


@pytest.fixture(scope="module")
def vit():
    return zoo.load_model("vit_digits")


def tree(**children: nn.Module) -> nn.Module:
    """A plain nn.Module holding ``children`` under their names."""
    m = nn.Module()
    for name, child in children.items():
        m.add_module(name, child)
    return m


def bert_like(layers: int = 12) -> nn.Module:
    """HF BERT's parameter names (``encoder.layer.N.attention.self.query``) on tiny Linears."""

    def block() -> nn.Module:
        attention = tree(
            self=tree(query=nn.Linear(2, 2), key=nn.Linear(2, 2), value=nn.Linear(2, 2)),
            output=tree(dense=nn.Linear(2, 2), LayerNorm=nn.LayerNorm(2)),
        )
        return tree(
            attention=attention, intermediate=tree(dense=nn.Linear(2, 4)), output=tree(dense=nn.Linear(4, 2))
        )

    embeddings = tree(word_embeddings=nn.Embedding(5, 2), LayerNorm=nn.LayerNorm(2))
    encoder = tree(layer=nn.ModuleList(block() for _ in range(layers)))
    return tree(embeddings=embeddings, encoder=encoder, pooler=tree(dense=nn.Linear(2, 2)))


def gpt2_like(layers: int = 3) -> nn.Module:
    """GPT-2's names (``transformer.h.N.attn.c_attn``, ``transformer.ln_f``, ``lm_head``)."""

    def block() -> nn.Module:
        return tree(
            ln_1=nn.LayerNorm(2),
            attn=tree(c_attn=nn.Linear(2, 6), c_proj=nn.Linear(2, 2)),
            ln_2=nn.LayerNorm(2),
            mlp=tree(c_fc=nn.Linear(2, 8), c_proj=nn.Linear(8, 2)),
        )

    transformer = tree(
        wte=nn.Embedding(5, 2), wpe=nn.Embedding(4, 2), h=nn.ModuleList(block() for _ in range(layers)),
        ln_f=nn.LayerNorm(2),
    )  # fmt: skip
    return tree(transformer=transformer, lm_head=nn.Linear(2, 5, bias=False))


def assert_partition(model, groups, target="weights", names=None, exclude=None):
    """Every group's filter selects exactly its members (with the same exclude), the groups are
    disjoint, and together they are the selection, in model order."""
    select = qfi.select_weights if target == "weights" else qfi.select_modules
    for g in groups:
        assert select(model, g.filter, exclude) == list(g.members), g.name
    members = [m for g in groups for m in g.members]
    assert len(members) == len(set(members))
    assert sorted(members) == sorted(select(model, names, exclude))


def test_vit_digits_blocks(vit):
    """The embedded ViT: one group per encoder layer, the rest by leading path; sizes add up."""
    groups = layer_groups(vit)
    assert [g.name for g in groups] == VIT_BLOCKS
    assert_partition(vit, groups)
    sizes = {i.name: i.numel for i in qfi.list_names(vit)}
    for g in groups:
        assert g.numel == sum(sizes[m] for m in g.members)
        assert g.bits("bf16") == 16 * g.numel and g.bits("int8") == 8 * g.numel
    layer0 = groups[3]
    assert layer0.filter == r"re:^encoder\.layers\.encoder_layer_0(\.|$)" and len(layer0.members) == 12


def test_vit_b_16_shape_has_twelve_layers():
    """ViT-B/16 names (built on the meta device, no memory, no forward): encoder_layer_0..11, and
    the filter of layer 1 is not also layers 10 and 11."""
    with torch.device("meta"):
        model = zoo.vit.vit_b_16_shaped()
    groups = layer_groups(model)
    layers = [g.name for g in groups if "encoder_layer_" in g.name]
    assert layers == [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    assert [g.name for g in groups if g.name not in layers] == [
        n for n in VIT_BLOCKS if "encoder_layer" not in n
    ]
    assert_partition(model, groups)
    one = next(g for g in groups if g.name == "encoder.layers.encoder_layer_1")
    assert all(m.startswith("encoder.layers.encoder_layer_1.") for m in qfi.select_weights(model, one.filter))


def test_bert_like_names():
    """HF BERT names: encoder.layer.0..11 (layer.1 is not layer.10), embeddings and pooler apart."""
    model = bert_like(12)
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["embeddings"] + [f"encoder.layer.{i}" for i in range(12)] + ["pooler"]
    assert_partition(model, groups)
    assert len(groups[2].members) == 2 * 6 + 2  # six Linears and a LayerNorm, weight and bias each


def test_gpt2_like_names():
    """GPT-2 names: transformer.h.N blocks; wte, wpe, ln_f and lm_head each a group of its own."""
    model = gpt2_like(3)
    groups = layer_groups(model)
    names = ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert [g.name for g in groups] == names + ["transformer.ln_f", "lm_head"]
    assert_partition(model, groups)


def test_module_rule():
    """rule='module': one group per module owning weights; a module's own tensors only, not its
    children's (the ViT's `encoder` holds pos_embedding and the layers)."""
    vit = zoo.load_model("vit_digits")
    groups = layer_groups(vit, rule="module")
    assert_partition(vit, groups)
    by = {g.name: g for g in groups}
    assert by["encoder"].members == ("encoder.pos_embedding",)
    attn = by["encoder.layers.encoder_layer_0.self_attention"]
    assert attn.members == (
        "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
        "encoder.layers.encoder_layer_0.self_attention.in_proj_bias",
    )
    assert by["class_token"].members == ("class_token",)  # a parameter of the root model
    bert = bert_like(2)
    assert_partition(bert, layer_groups(bert, rule="module"))
    assert layer_groups(bert, rule="module")[2].name == "encoder.layer.0.attention.self.query"


def test_models_without_blocks_group_by_top_level_module():
    """The digits CNN (conv1, conv2, fc1, fc2: no indexed segment) gets one group per module."""
    cnn = zoo.load_model("cnn_digits")
    groups = layer_groups(cnn)
    assert [g.name for g in groups] == ["conv1", "conv2", "fc1", "fc2"]
    assert_partition(cnn, groups)


def test_an_index_that_never_repeats_is_no_block():
    """A wrapper with one indexed child (``body.0``, a one-element Sequential) is no block: the
    blocks are the repeated ``body.0.blocks.N`` inside it, and the single ``head.0`` is ``head``."""
    body = nn.Sequential(tree(blocks=nn.ModuleList(nn.Linear(2, 2) for _ in range(3))))
    model = tree(body=body, head=nn.Sequential(nn.Linear(2, 2)))
    groups = layer_groups(model)
    assert [g.name for g in groups] == [f"body.0.blocks.{i}" for i in range(3)] + ["head"]
    assert_partition(model, groups)


def test_names_and_exclude_narrow_each_group(vit):
    """With a name filter and an exclude, each group holds only the selected names of its layer
    (an exact filter, since the layer's prefix would select more)."""
    groups = layer_groups(vit, names="mlp", exclude="encoder_layer_1")
    assert [g.name for g in groups] == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_2"]
    assert_partition(vit, groups, names="mlp", exclude="encoder_layer_1")
    assert all(".mlp." in m for g in groups for m in g.members)
    one = layer_groups(vit, names="encoder_layer_1,encoder.ln")  # blocks are found over the model
    assert [g.name for g in one] == ["encoder.layers.encoder_layer_1", "encoder.ln"]
    assert one[0].filter == r"re:^encoder\.layers\.encoder_layer_1(\.|$)"


def test_names_with_commas_get_escaped_filters():
    """A module name with a comma (filters split on commas) still gets an exact filter."""
    model = tree(**{"a,b": nn.Linear(2, 2), "a": nn.Linear(2, 2)})
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["a,b", "a"] and "," not in groups[0].filter
    assert_partition(model, groups)


def test_activation_groups(vit):
    """target='activations': the block module and its sub-modules form the layer's group; with an
    example the group sizes are the output values per sample."""
    example = zoo.load_data("digits")[0][0][None]
    groups = layer_groups(vit, "activations", example=example)
    assert [g.name for g in groups] == [
        "conv_proj", "encoder", *VIT_BLOCKS[3:6], "encoder.ln", "heads",
    ]  # fmt: skip
    assert_partition(vit, groups, target="activations")
    layer0 = groups[2]
    assert (
        layer0.members[0] == "encoder.layers.encoder_layer_0"
        and "encoder.layers.encoder_layer_0.mlp.0" in layer0.members
    )
    sizes = {i.name: i.numel for i in qfi.list_names(vit, "activations", example=example)}
    assert layer0.numel == sum(sizes[m] for m in layer0.members)
    assert layer_groups(vit, "activations")[0].numel is None  # no example: sizes unknown
    modules = layer_groups(vit, "activations", rule="module")
    assert_partition(vit, modules, target="activations")
    assert len(modules) == len(qfi.select_modules(vit))


def test_bad_rule_and_target(vit):
    with pytest.raises(QfiError, match="unknown layer grouping rule 'index'; allowed: block, module"):
        layer_groups(vit, rule="index")
    with pytest.raises(QfiError, match="target must be 'weights' or 'activations', got 'bias'"):
        layer_groups(vit, target="bias")


def test_fitted_bers(vit):
    """Per bit: 1e-3; every bit: five decades whose top one flips every group at least once and
    the largest at least 100 times per trial."""
    groups = layer_groups(vit)
    assert fitted_bers(groups, "fp32", per_bit=True) == (1e-3,)
    assert fitted_bers(groups, "fp32", per_bit=False) == (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)  # 48 x 32 bits
    assert fitted_bers(groups, "int8", per_bit=False) == (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # 48 x 8 bits
    mlp = layer_groups(vit, names="mlp", rule="module")  # 4,656 x 32 bits at least
    assert fitted_bers(mlp, "fp32", per_bit=False)[-1] == 1e-3  # 100 flips in the largest group


def test_layer_map_sweep_writes_table_and_heatmap(tmp_path, vit):
    """One campaign (one folder, one manifest) over every layer: per_layer.csv with one row per
    layer x bit x condition and the promised columns, per_layer.png; a rerun resumes everything."""
    cfg = CampaignConfig(formats="int8", bits="all", ber=1e-3, flips=1, reps=2, limit=64, out=str(tmp_path))
    res = layer_map(cfg, model=vit, progress=False)
    table = pd.read_csv(tmp_path / "per_layer.csv")
    assert set(table.columns) == PER_LAYER_COLUMNS
    assert len(table) == len(VIT_BLOCKS) * 8 * 2
    assert list(dict.fromkeys(table["layer"])) == VIT_BLOCKS and (table["order"].diff().dropna() >= 0).all()
    assert (table["size_bits"] == 8 * table["numel"]).all() and (table["trials"] == 2).all()
    ones = table[table["fault"] == "flips"]
    assert (ones["flips_mean"] == 1).all() and (ones["expected_flips"] == 1).all()
    ber = table[table["fault"] == "ber"]
    assert ber["expected_flips"].tolist() == pytest.approx((ber["numel"] * 1e-3).tolist())
    assert (table["top1_ci_low"] <= table["top1_mean"] + 1e-12).all()
    assert (table["top1_mean"] <= table["top1_ci_high"] + 1e-12).all()
    assert set(res.campaign.summary["names"]) == {g.filter for g in res.groups}
    assert (tmp_path / "per_layer.png").stat().st_size > 10_000
    assert not (tmp_path / "per_bit.png").exists()  # one panel per layer would be unreadable
    again = layer_map(cfg, model=vit, progress=False)
    assert again.campaign.trials_run == 0 and again.campaign.trials_resumed == len(VIT_BLOCKS) * 8 * 2 * 2
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "per_layer.csv"), table)


def test_layer_map_activations(tmp_path, vit):
    """An activation layer map over BERs: group sizes from one forward of the first sample."""
    cfg = CampaignConfig(
        target="activations", formats="int8", ber="1e-4,1e-3", reps=2, limit=32, out=str(tmp_path)
    )
    res = layer_map(cfg, model=vit, plots=False)
    t = res.table
    assert t["layer"].nunique() == 7 and t["numel"].notna().all() and t["expected_flips"].isna().all()
    assert (t["target"] == "activations").all() and set(t["ber"]) == {1e-4, 1e-3}
    assert not (tmp_path / "per_layer.png").exists()


def test_layer_map_scores_with_the_campaign_metric(tmp_path, vit):
    """With metric loss (lower is better) the table carries loss with its CI and ``loss_rise``
    (mean - clean, the name per_bit.csv uses), and the map shows it."""
    cfg = CampaignConfig(
        metric="loss", formats="fp32", bits="26", ber=1e-3, reps=2, limit=32, out=str(tmp_path)
    )
    res = layer_map(cfg, model=vit)
    assert res.metric == "loss"
    t = pd.read_csv(tmp_path / "per_layer.csv")
    assert {"loss_mean", "loss_ci_low", "loss_ci_high", "loss_rise", "clean_loss", "golden_loss"} <= set(
        t.columns
    )
    assert "top1_mean" not in t.columns
    assert t["loss_rise"].to_numpy() == pytest.approx((t["loss_mean"] - t["clean_loss"]).to_numpy(), abs=1e-5)
    assert t["loss_rise"].max() > 0  # ~19 flips of bit 26 in an encoder layer
    assert (tmp_path / "per_layer.png").exists()


def synthetic_summary(groups, metric="cosine", bits=32):
    """A summary shaped like a campaign's, with a metric other than top-1, for table and plot."""
    rows = []
    for i, g in enumerate(groups):
        for b in range(bits):
            mean = 0.2 if b == 30 and i % 2 else 0.99
            rows.append({
                "format": "fp32", "target": "weights", "names": g.filter, "fault": "ber", "ber": 1e-3,
                "count": 0, "bit": b, "bit_name": f"b{b}", "trials": 3, "flips_mean": 0.0 if i == 0 else 2.0,
                f"{metric}_mean": mean, f"{metric}_ci_low": mean - 0.01, f"{metric}_ci_high": mean + 0.01,
                "sdc_mean": 0.0, "due_mean": 0.0, f"clean_{metric}": 0.99, f"golden_{metric}": 1.0,
            })  # fmt: skip
    return pd.DataFrame(rows)


def test_panels_mark_unflipped_and_non_finite_cells(tmp_path):
    """A cell whose trials flipped nothing reads '-'; a flipped cell whose mean loss is NaN or inf
    (non-finite outputs) reads nan / inf and is drawn, not mistaken for an unflipped one."""
    with torch.device("meta"):
        groups = layer_groups(zoo.vit.vit_b_16_shaped())[:3]
    s = synthetic_summary(groups, metric="loss", bits=4)
    s.loc[(s["names"] == groups[1].filter) & (s["bit"] == 3), "loss_mean"] = float("nan")
    s.loc[(s["names"] == groups[2].filter) & (s["bit"] == 3), "loss_mean"] = float("inf")
    table = per_layer_table(s, groups, metric="loss", higher_is_better=False)
    assert "loss_rise" in table.columns and "loss_drop" not in table.columns
    (panel,) = layer_grids(table, "loss")
    text = panel.text()
    assert list(text.columns) == [3, 2, 1, 0] and list(text.index) == [g.name for g in groups]
    assert (text.iloc[0] == "-").all()  # group 0: no flips
    assert text.iloc[1][3] == "nan" and text.iloc[2][3] == "inf" and text.iloc[1][2] == "0.99"
    assert plot_layer_map(table, tmp_path / "m.png", "loss", higher_is_better=False).stat().st_size > 5_000


def test_table_and_plot_take_the_metric_name(tmp_path):
    """per_layer_table reads <metric>_mean/_ci_low/_ci_high and clean_<metric> for any metric;
    the heatmap draws 17 layers x 32 bits; an unknown metric names the ones the summary has."""
    with torch.device("meta"):
        groups = layer_groups(zoo.vit.vit_b_16_shaped())
    table = per_layer_table(synthetic_summary(groups), groups, metric="cosine")
    assert {"cosine_mean", "cosine_ci_low", "cosine_ci_high", "cosine_drop", "clean_cosine"} <= set(
        table.columns
    )
    assert table["cosine_drop"].max() == pytest.approx(0.79)
    assert table["layer"].nunique() == 17
    png = plot_layer_map(table, tmp_path / "map.png", metric="cosine")
    assert png.stat().st_size > 20_000
    with pytest.raises(QfiError, match=r"metric 'top1' has no columns .*known: \['cosine'\]"):
        per_layer_table(synthetic_summary(groups), groups)


@pytest.fixture
def layers_parser():
    ap = _Parser(prog="qfi")
    add_parser(ap.add_subparsers(dest="command", parser_class=_Parser))
    return ap


def test_cli_layers(tmp_path, capsys, layers_parser):
    """`qfi layers`: per-bit map by default (BER 1e-3), printed as a layers x bits table."""
    out = tmp_path / "layers"
    argv = ["layers", "--format", "int8", "--reps", "1", "--limit", "32", "--quiet", "--out", str(out)]
    assert cmd_layers(layers_parser.parse_args(argv)) == 0
    text = capsys.readouterr().out
    assert "BER 0.001" in text and "8 layer groups" in text
    assert "encoder.layers.encoder_layer_2" in text and "per-bit BER 0.001" in text
    t = pd.read_csv(out / "per_layer.csv")
    assert sorted(set(t["bit"])) == list(range(8)) and (out / "per_layer.png").exists()


def test_cli_layers_fitted_decades_and_module_rule(tmp_path, capsys, layers_parser):
    """--bits none without --ber: five decades fitted to the groups; --rule module; --no-plots."""
    out = tmp_path / "layers"
    argv = ["layers", "--bits", "none", "--rule", "module", "--names", "mlp", "--reps", "1", "--limit", "32"]
    assert cmd_layers(layers_parser.parse_args([*argv, "--quiet", "--no-plots", "--out", str(out)])) == 0
    text = capsys.readouterr().out
    assert "BER 1e-07, 1e-06, 1e-05, 0.0001, 0.001" in text and "6 layer groups" in text
    t = pd.read_csv(out / "per_layer.csv")
    assert t["layer"].nunique() == 6 and not (out / "per_layer.png").exists()


def test_qfi_run_manifest_of_a_layer_map_writes_the_map_again(tmp_path, capsys):
    """`qfi run <out>/manifest.json` of a `qfi layers` folder resumes every trial and writes
    per_layer.csv again, from the groups the manifest recorded (not from a new grouping)."""
    import json

    from qfi.cli import main

    out = tmp_path / "layers"
    argv = ["layers", "--format", "int8", "--bits", "7", "--reps", "1", "--limit", "32", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layer_map"]["rule"] == "block" and len(manifest["layer_map"]["groups"]) == 8
    want = pd.read_csv(out / "per_layer.csv")
    (out / "per_layer.csv").unlink()
    (out / "per_layer.png").unlink()
    # the recorded groups are used as they are: a renamed group comes back under its new name
    first = manifest["layer_map"]["groups"][0]["name"]
    manifest["layer_map"]["groups"][0]["name"] = "renamed"
    (out / "manifest.json").write_text(json.dumps(manifest))
    want["layer"] = want["layer"].replace(first, "renamed")
    capsys.readouterr()
    assert main(["run", str(out / "manifest.json"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "0 trials run" in text and "8 layer groups" in text
    pd.testing.assert_frame_equal(pd.read_csv(out / "per_layer.csv"), want)
    assert (out / "per_layer.png").exists()


def test_cli_layers_one_format(layers_parser):
    a = layers_parser.parse_args(["layers", "--format", "fp32,int8"])
    with pytest.raises(QfiError, match="maps one format"):
        cmd_layers(a)


HF_PLUGIN = """
import torch
import transformers as tf

def bert():
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=16)
    return tf.BertModel(config)

def tokens(n=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (n, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(n, 6, dtype=torch.long)}
"""


def test_hf_bert_layer_map_with_cosine(tmp_path, monkeypatch):
    """A real HF BERT (built from a config, no download): encoder.layer.N groups, dict batches,
    ModelOutput outputs, scored by cosine drift; weights and activations."""
    pytest.importorskip("transformers")
    (tmp_path / "qfi_layers_hf.py").write_text(HF_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = dict(
        model="qfi_layers_hf:bert", data="qfi_layers_hf:tokens", metric="cosine", formats="bf16", reps=2
    )
    res = layer_map(CampaignConfig(**base, bits="14", ber=1e-2, out=str(tmp_path / "w")))
    layers = ["embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "pooler"]
    assert [g.name for g in res.groups] == layers and res.metric == "cos_mean"
    t = pd.read_csv(tmp_path / "w" / "per_layer.csv")
    assert list(t["layer"]) == layers and {"cos_mean_mean", "cos_mean_drop", "clean_cos_mean"} <= set(
        t.columns
    )
    assert (tmp_path / "w" / "per_layer.png").exists()
    acts = layer_map(
        CampaignConfig(**base, target="activations", ber=1e-3, calibrate=8, out=str(tmp_path / "a"))
    )
    assert [g.name for g in acts.groups if g.name.startswith("encoder.layer.")] == layers[1:4]
    assert acts.table["numel"].notna().all()  # sizes from one forward of a dict batch
