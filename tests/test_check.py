"""The compile's held-out check: the checkpoint's KL to the original model on sequences that no pass
calibrates on, measured during the quantize sweep (passes/quantize.py HeldOut)."""
import json

import pytest
import torch

from conftest import corpus
from quantc.calibration.data import calibration_tokens, check_tokens
from quantc.config import parse_config
from quantc.model import load_model, load_tokenizer
from quantc.pipeline import compile_model
from quantc.runtime import load


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """A JSON Lines source of separate documents: the check's are those after the calibration's."""
    p = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    text = corpus(12000, seed=5).split()
    p.write_text("".join(json.dumps({"text": " ".join(text[i:i + 300])}) + "\n" for i in range(0, len(text), 300)))
    return p


def raw(model, docs, **cal):
    return {"model": str(model), "quant": {"bits": 3, "group_size": 32},
            "calibration": {"source": str(docs), "samples": 6, "seq_len": 48, "batch_size": 4, **cal}}


def kl_of_checkpoint(folder, source, tokens) -> float:
    """KL(original ‖ checkpoint) per token from the two models' full logits, at the positions the check
    compares (every second one, each predicting the next token)."""
    with torch.no_grad():
        ref = load_model(str(source))(input_ids=tokens).logits[:, :-1:2].double()
        got = load(folder)(input_ids=tokens).logits[:, :-1:2].double()
    p = ref.log_softmax(-1)
    return float((p.exp() * (p - got.log_softmax(-1))).sum(-1).mean())


@pytest.mark.parametrize("qep", [0.0, 0.5])
def test_the_check_is_the_checkpoints_kl_to_the_original_on_unseen_text(tmp_path, tiny_models, docs, qep):
    r = raw(tiny_models["llama"], docs, check_samples=3)
    r["quant"]["qep_alpha"] = qep
    cfg = parse_config(r, "t.yaml")
    m = compile_model(cfg, tmp_path / "out", progress=False)
    tok = load_tokenizer(str(tiny_models["llama"]))
    held, calib = check_tokens(cfg.calibration, tok), calibration_tokens(cfg.calibration, tok)
    assert held.shape == (3, 48)
    assert not any(torch.equal(h, c) for h in held for c in calib)         # text no pass calibrated on
    c = m["check"]
    assert c["sequences"] == 3 and c["positions"] == 3 * 24
    expected = kl_of_checkpoint(tmp_path / "out", tiny_models["llama"], held)
    assert expected > 1e-4                                                  # 3-bit: a real distance
    # the sweep's float32 weights against the checkpoint's float16 scales: close, not equal
    assert c["kl"] == pytest.approx(expected, rel=0.01)
    assert json.loads((tmp_path / "out" / "quantc.json").read_text())["check"] == c


def test_the_check_changes_no_byte_of_the_checkpoint(tmp_path, tiny_models, docs):
    """The held-out sequences come after the calibration's: the calibration, and so every weight, is
    the same with the check as without it (and the lazy model's tied lm_head, read back for the
    check, is still exported as tied)."""
    outs = {}
    for n in (0, 2):
        outs[n] = compile_model(parse_config(raw(tiny_models["llama"], docs, check_samples=n), "t.yaml"),
                                tmp_path / f"c{n}", progress=False)
    assert outs[0]["check"] is None and "check_s" not in outs[0]["timings"]
    assert outs[2]["timings"]["check_forward_s"] > 0
    assert outs[2]["check"]["sequences"] == 2
    for f in ("model.safetensors", "config.json", "quantize_config.json"):
        assert (tmp_path / "c0" / f).read_bytes() == (tmp_path / "c2" / f).read_bytes(), f


def test_a_source_with_nothing_left_compiles_without_a_check(tmp_path, tiny_models, docs, caplog):
    n_docs = len(docs.read_text().splitlines())
    m = compile_model(parse_config(raw(tiny_models["llama"], docs, samples=n_docs, check_samples=2), "t.yaml"),
                      tmp_path / "out", progress=False)
    assert m["check"] is None
    assert "no document left after the calibration's" in caplog.text


def test_check_samples_must_not_be_negative(tiny_models, docs):
    from quantc.errors import ConfigError
    with pytest.raises(ConfigError, match=r"calibration\.check_samples.*0 \(no check\)"):
        parse_config(raw(tiny_models["llama"], docs, check_samples=-1), "t.yaml")
