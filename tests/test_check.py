"""The compile's held-out check: the checkpoint's KL to the original model on sequences that no pass
calibrates on, measured during the quantize sweep (passes/quantize.py HeldOut)."""
import itertools
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


def test_calibration_and_check_read_the_source_once(tiny_models, docs, monkeypatch, caplog):
    """One draw gives both: a streamed `hf:` dataset is read once per process, not once for the
    preflight, once for the calibration and once for the check; the calibration's rows are those of a
    draw without a check, and a source that runs out only in the check's rows does not warn."""
    import dataclasses
    from quantc.calibration import data
    texts = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    reads = []
    data._MEMO.clear()                  # a draw remembered by another test of this process

    def stream(source, field):
        reads.append(source)
        yield from texts
    monkeypatch.setattr(data, "_hf_docs", stream)
    tok = load_tokenizer(str(tiny_models["llama"]))
    cal = parse_config(raw(tiny_models["llama"], docs, check_samples=3), "t.yaml").calibration
    cal = dataclasses.replace(cal, source="hf:someone/text")
    calib = calibration_tokens(cal, tok)
    held = check_tokens(cal, tok)
    assert torch.equal(calibration_tokens(cal, tok), calib)
    assert reads == ["hf:someone/text"]
    alone = calibration_tokens(dataclasses.replace(cal, check_samples=0), tok)
    assert torch.equal(calib, alone) and held.shape == (3, 48)
    assert not any(torch.equal(h, c) for h in held for c in calib)
    # the last two documents left for a check of three: fewer rows, no warning
    short = dataclasses.replace(cal, samples=len(texts) - 2)
    with caplog.at_level("WARNING", logger="quantc"):
        assert check_tokens(short, tok).shape == (2, 48)
        assert calibration_tokens(short, tok).shape == (len(texts) - 2, 48)
    assert "documents have" not in caplog.text
    # and a source that runs out in the calibration's own rows does
    calibration_tokens(dataclasses.replace(cal, samples=len(texts) + 1), tok)
    assert f"only {len(texts)} documents have 48 tokens; calibrating on {len(texts)} samples" in caplog.text


def test_a_text_files_check_windows_overlap_no_calibration_window(tmp_path, tiny_models):
    """A .txt source has no documents: its check windows are drawn on from the same generator, and
    any that would share a token position with a calibration window is drawn again."""
    from quantc.calibration.data import windows_from_text
    tok = load_tokenizer(str(tiny_models["llama"]))
    text = corpus(3000, seed=2)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    calib = windows_from_text(text, tok, 20, 32, 0, "t")
    both = windows_from_text(text, tok, 20, 32, 0, "t", more=4)
    assert torch.equal(both[:20], calib) and both.shape == (24, 32)     # the calibration's rows unchanged
    ids = tok(text, add_special_tokens=False)["input_ids"]
    starts = {}
    for row in both.tolist():      # each row's start in the text (rows are distinct windows of it)
        starts.setdefault(tuple(row), [s for s in range(n - 31) if ids[s:s + 32] == row][0])
    cal_starts = [starts[tuple(r)] for r in both[:20].tolist()]
    for r in both[20:].tolist():
        assert all(abs(starts[tuple(r)] - c) >= 32 for c in cal_starts)
    for a, b in itertools.combinations([starts[tuple(r)] for r in both[20:].tolist()], 2):
        assert abs(a - b) >= 32                                          # nor each other
    # a text shorter than two windows: any two windows overlap, so no check rows; the calibration as before
    words = text.split()
    k = next(k for k in range(len(words)) if len(tok(" ".join(words[:k]), add_special_tokens=False)["input_ids"]) >= 40)
    short = " ".join(words[:k])
    assert len(tok(short, add_special_tokens=False)["input_ids"]) < 64
    full = windows_from_text(short, tok, 30, 32, 0, "t", more=4)
    assert torch.equal(full, windows_from_text(short, tok, 30, 32, 0, "t"))


def test_a_json_file_may_hold_one_array_of_documents(tmp_path, tiny_models, docs):
    texts = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    arr = tmp_path / "docs.json"
    arr.write_text("\ufeff" + json.dumps([{"text": t} for t in texts], indent=2), encoding="utf-8")   # a BOM too
    tok = load_tokenizer(str(tiny_models["llama"]))
    a = parse_config(raw(tiny_models["llama"], arr, check_samples=2), "t.yaml").calibration
    b = parse_config(raw(tiny_models["llama"], docs, check_samples=2), "t.yaml").calibration
    assert torch.equal(calibration_tokens(a, tok), calibration_tokens(b, tok))
    assert torch.equal(check_tokens(a, tok), check_tokens(b, tok))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"text": texts[0]}, {"body": "x"}]))
    from quantc.errors import QuantcError
    with pytest.raises(QuantcError, match=r"bad.json: item 1 of the array has no string field 'text' \(it has "
                                          r"'body'\); set calibration.text_field"):
        calibration_tokens(parse_config(raw(tiny_models["llama"], bad), "t.yaml").calibration, tok)


def test_the_preflight_reads_the_checks_documents_too(tmp_path, tiny_models, docs):
    """A bad line among the check's documents stops the compile before the model loads, as one among
    the calibration's does, not after the measurement."""
    from quantc.errors import QuantcError
    from quantc.preflight import check_calibration
    lines = docs.read_text().splitlines()
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(lines[:8] + ["{not json"] + lines[8:]) + "\n")
    ok = parse_config(raw(tiny_models["llama"], src, samples=6, check_samples=2), "t.yaml")
    check_calibration(ok)                                   # rows 1-8 hold every document it reads
    with pytest.raises(QuantcError, match=r"d.jsonl:9: not valid JSON"):
        check_calibration(parse_config(raw(tiny_models["llama"], src, samples=6, check_samples=3), "t.yaml"))


def test_an_hf_dataset_without_the_text_field_names_the_key(monkeypatch, tiny_models, docs):
    import sys
    import types
    from quantc.errors import QuantcError
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config, split, streaming: iter([{"content": "a b c", "id": 1}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    import dataclasses
    cal = dataclasses.replace(parse_config(raw(tiny_models["llama"], docs), "t.yaml").calibration,
                              source="hf:someone/code")
    with pytest.raises(QuantcError, match=r"'hf:someone/code': row 0 has no string field 'text' \(it has "
                                          r"'content', 'id'\); set calibration.text_field"):
        calibration_tokens(cal, load_tokenizer(str(tiny_models["llama"])))
