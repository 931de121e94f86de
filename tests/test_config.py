"""CampaignConfig: the one source of truth for CLI flags and YAML keys validates every field."""

import pytest

from qfi.config import CampaignConfig, parse_bers, parse_bits
from qfi.errors import QfiError


def test_ber_decades_and_lists():
    """'lo:hi' gives every decade, both ends included; 'lo:hi:k' k points per decade; lists concatenate."""
    assert parse_bers("1e-10:1e-6") == (1e-10, 1e-9, 1e-8, 1e-7, 1e-6)
    assert parse_bers("1e-4:1e-3:2") == (1e-4, 3.16228e-4, 1e-3)
    assert parse_bers("0,1e-5") == (0.0, 1e-5)
    assert parse_bers(1e-3) == (1e-3,)


@pytest.mark.parametrize("spec", ["1e-3:1e-6", "abc", "1e-6:1e-3:0", "0:1e-3"])
def test_bad_ber_specs_name_the_value(spec):
    """A malformed BER spec is rejected with a message quoting it and the allowed forms."""
    with pytest.raises(QfiError, match="bad BER spec"):
        parse_bers(spec)


def test_bits_specs():
    """'none' = any bit (-1), 'all' = each position, ranges are inclusive, positions checked
    against the format."""
    assert parse_bits("none", 8) == (-1,)
    assert parse_bits("all", 8) == tuple(range(8))
    assert parse_bits("0:2,7", 8) == (0, 1, 2, 7)
    with pytest.raises(QfiError, match=r"bit 8 is outside the format: allowed 0\.\.7"):
        parse_bits("8", 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ber": 1.5}, r"BER 1\.5 is outside \[0, 1\]"),
        ({"ber": -0.1}, r"BER -0\.1 is outside \[0, 1\]"),
        ({"formats": "fp33"}, r"fp33.*fp32"),
        ({"formats": "int8", "bits": "31"}, r"bit 31 is outside the format: allowed 0\.\.7"),
        ({"target": "neurons"}, r"unknown target 'neurons'; allowed: weights, activations"),
        ({"reps": 0}, r"reps 0 must be >= 1"),
        ({"ber": (), "flips": ()}, r"nothing to sweep"),
        ({"flips": (-1,)}, r"flip count -1 is negative"),
    ],
)
def test_config_errors(kwargs, match):
    """Every bad field is rejected at construction, naming the value and what is allowed."""
    with pytest.raises(QfiError, match=match):
        CampaignConfig(**kwargs)


def test_yaml_round_trip(tmp_path):
    """A YAML file with CampaignConfig keys builds the same config; unknown keys are listed."""
    cfg = CampaignConfig(formats=("fp32", "int8"), ber="1e-6:1e-4", names=("mlp,ln", "self_attention"))
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict()))
    assert CampaignConfig.from_yaml(str(p)) == cfg
    p.write_text("formats: [fp32]\nbers: 1e-6\n")
    with pytest.raises(QfiError, match=r"unknown campaign key\(s\) \['bers'\]"):
        CampaignConfig.from_yaml(str(p))


def test_example_campaign_file_lists_every_key():
    """examples/campaign.yaml names every CampaignConfig field (so it documents them all) and loads."""
    import dataclasses
    from pathlib import Path

    import yaml

    path = Path(__file__).parent.parent / "examples" / "campaign.yaml"
    keys = set(yaml.safe_load(path.read_text()))
    assert keys == {f.name for f in dataclasses.fields(CampaignConfig)}
    cfg = CampaignConfig.from_yaml(str(path))
    assert cfg.names == ("mlp,ln", "self_attention") and cfg.ber == (1e-6, 1e-5, 1e-4, 1e-3)


def test_repeated_conditions_run_once_and_format_names_are_canonical():
    """Repeated formats (any case), BERs, flip counts and name groups are dropped, order kept:
    otherwise a condition would get twice the trials under one seed."""
    cfg = CampaignConfig(formats="fp32,FP32,int8", ber="1e-6,1e-6,1e-5", flips=(3, 3), names=("mlp", "mlp"))
    assert cfg.formats == ("fp32", "int8")
    assert cfg.ber == (1e-6, 1e-5) and cfg.flips == (3,) and cfg.names == ("mlp",)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reps": "five"}, r"reps 'five' must be an integer"),
        ({"reps": [1]}, r"reps \[1\] must be an integer"),
        ({"limit": 2.5}, r"limit 2\.5 must be an integer"),
        ({"dynamic": "yes"}, r"dynamic 'yes' must be true or false"),
        ({"dynamic": True}, r"dynamic applies to target 'activations' only"),
        ({"target": "activations", "calibrate": 0}, r"calibrate 0 must be >= 1"),
        ({"flips": "a,b"}, r"bad flip counts 'a,b'"),
        ({"device": 0}, r"device 0 must be a string"),
    ],
)
def test_wrongly_typed_yaml_values_are_errors_not_tracebacks(kwargs, match):
    """YAML gives strings, lists and floats where integers are meant: QfiError naming key and value."""
    with pytest.raises(QfiError, match=match):
        CampaignConfig(**kwargs)
    assert CampaignConfig(reps="3").reps == 3  # a quoted integer is fine


def test_manifest_config_reruns_in_its_own_folder(tmp_path):
    """A manifest's config is a full CampaignConfig; loaded from <dir>/manifest.json its out is <dir>,
    wherever the manifest was written from, so `qfi run <dir>/manifest.json` resumes there."""
    import json

    cfg = CampaignConfig(formats=("int8",), ber=1e-4, out="somewhere/else")
    d = tmp_path / "run1"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"config": cfg.to_dict(), "model_hash": "x"}))
    again = CampaignConfig.from_yaml(str(d / "manifest.json"))
    assert again.out == str(d)
    assert again.identity() == cfg.identity()
