"""Calibration sequences: N windows of `seq_len` tokens, reproducible from a seed.

Sources: a .jsonl file (one JSON object per line with a text field; a .json file may also hold one
array of such objects), a .txt file, a Hugging Face
dataset (`hf:name[:config[:split]]`, needs the `datasets` package and network), or `self`:
sequences sampled from the model itself, so a compile needs nothing but the model.
"""
from __future__ import annotations

import bisect
import contextlib
import json
import logging
import random
from pathlib import Path

import torch

from .. import durable
from ..errors import QuantcError

log = logging.getLogger("quantc")


_MEMO: dict = {}     # the last draw of a text source (calibration rows + check rows), by identity and settings


def _memo_key(cal, tokenizer):
    """A text source's draw is remembered for the process: the preflight's early read, the calibration
    and the held-out check then cost one read of a file and one stream of an `hf:` dataset."""
    if cal.source == "self":
        return None
    ident = (cal.source,)
    if not cal.source.startswith("hf:"):
        try:
            st = Path(cal.source).stat()
        except OSError:
            return None
        ident = (cal.source, st.st_size, st.st_mtime_ns)
    return ident + (cal.samples, cal.check_samples, cal.seq_len, cal.seed, cal.text_field, _vocab_key(tokenizer))


def _vocab_key(tokenizer):
    """The tokenizer by what it maps, not by where it was read: a hub model's tokenizer is read by its
    id in the preflight and from its downloaded folder in the compile."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    return (type(tokenizer).__name__, len(tokenizer), hash(frozenset(vocab.items())))


def check_source(cal) -> None:
    """The calibration source's format now, not after the model has loaded: an empty file, a file that
    is not UTF-8, a first document that is not JSON or lacks the text field (the preflight's draw
    then reads every document the compile will use: preflight.check_calibration)."""
    if cal.source == "self":
        return
    if cal.source.startswith("hf:"):
        import importlib.util
        if importlib.util.find_spec("datasets") is None:
            raise QuantcError("calibration.source hf:... needs the `datasets` package: pip install datasets")
        return
    path = Path(cal.source)
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            if not any(text.strip() for text in _json_docs(path, cal.text_field)):
                raise QuantcError(f"{path}: the calibration file has no text (empty, or every {cal.text_field!r} "
                                  "is empty); add documents or use calibration.source: self")
        elif not path.read_text(encoding="utf-8").strip():
            raise QuantcError(f"{path}: the calibration file is empty; add text or use calibration.source: self")
    except UnicodeDecodeError as e:
        raise QuantcError(f"{path}: not a UTF-8 text file (byte {e.start}); save it as UTF-8") from None


def calibration_tokens(cal, tokenizer, model=None, device: torch.device | None = None) -> torch.Tensor:
    """int64 [samples, seq_len] calibration tokens for a `Calibration` config. `device`: the compile's
    device, where `self` samples when the model fits there (sampling_device)."""
    if cal.source == "self":
        return _calibration_tokens(cal, tokenizer, model, device)
    return _drawn(cal, tokenizer)[:cal.samples]


def check_tokens(cal, tokenizer, model=None, device: torch.device | None = None) -> torch.Tensor:
    """int64 [check_samples, seq_len]: the compile's held-out check sequences, which no pass calibrates
    on (possibly fewer rows, or none, when the source runs out). From a document source (.jsonl, hf:),
    the windows of the `check_samples` documents after the calibration's: the same draw with more
    samples, whose first `samples` rows are the calibration's. From a .txt file, windows drawn on from
    the same generator that overlap no calibration window. From `self`, sequences the model samples
    with the next seed (a draw of their own, so the calibration's tokens stay those of a compile
    without a check)."""
    if cal.check_samples < 1:
        return torch.zeros(0, cal.seq_len, dtype=torch.int64)
    if cal.source == "self":
        return calibration_tokens(self_check(cal), tokenizer, model, device)
    return _drawn(cal, tokenizer)[cal.samples:]


def _drawn(cal, tokenizer) -> torch.Tensor:
    """A text source's one draw: the calibration's `samples` rows, then up to `check_samples` more (the
    check's). Rows are drawn one after the other from one seeded generator, so the first `samples` are
    those of a draw without a check."""
    key = _memo_key(cal, tokenizer)
    if key is not None and key in _MEMO:
        return _MEMO[key].clone()
    t = _calibration_tokens(cal, tokenizer, more=max(cal.check_samples, 0))
    if key is not None:
        _MEMO.clear()
        _MEMO[key] = t.clone()
    return t


def self_check(cal):
    """The draw of a `self` calibration's check sequences: `check_samples` of them with the next seed."""
    import dataclasses
    return dataclasses.replace(cal, samples=cal.check_samples, seed=cal.seed + 1)


def _calibration_tokens(cal, tokenizer, model=None, device: torch.device | None = None,
                        more: int = 0) -> torch.Tensor:
    """`cal.samples` rows (a text source: and up to `more` rows after them; a short source warns only
    when the calibration's own rows run out)."""
    if cal.source == "self":
        if model is None:
            raise QuantcError("calibration.source `self` needs the model")
        from ..lazy import materialize_all, release_all
        materialize_all(model)             # sampling runs the whole model (lazy models: all layers)
        try:
            where = sampling_device(model, device, cal)
            try:
                with _placed(model, where):
                    return sample_from_model(model, cal.samples, cal.seq_len, cal.seed)
            except torch.OutOfMemoryError:
                if where.type == "cpu":
                    raise
                log.warning("calibration.source self: %s ran out of memory while sampling; sampling on the CPU "
                            "(slow for large models: give a text file as calibration.source instead)", where)
            return sample_from_model(model, cal.samples, cal.seq_len, cal.seed)
        finally:
            release_all(model)
    if cal.source.startswith("hf:"):
        docs = _hf_docs(cal.source, cal.text_field)
        return windows_from_docs(docs, tokenizer, cal.samples, cal.seq_len, cal.seed, cal.source, more)
    path = Path(cal.source)
    if path.suffix.lower() in (".jsonl", ".json"):
        return windows_from_docs(_json_docs(path, cal.text_field), tokenizer, cal.samples, cal.seq_len,
                                 cal.seed, str(path), more)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QuantcError(f"{path}: not a UTF-8 text file (byte {e.start}); save it as UTF-8") from None
    return windows_from_text(text, tokenizer, cal.samples, cal.seq_len, cal.seed, str(path), more)


def _json_docs(path: Path, field: str):
    """The text field of each object of a JSON Lines file, or of a .json file that holds one array."""
    if path.suffix.lower() == ".json":
        with path.open(encoding="utf-8-sig") as f:      # -sig: a byte-order mark, as editors may write
            head = f.read(4096).lstrip()
        if head.startswith("["):
            yield from _json_array_docs(path, field)
            return
    yield from _jsonl_docs(path, field)


def _json_array_docs(path: Path, field: str):
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise QuantcError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); calibration.source takes JSON Lines "
                          f'or one array of objects such as [{{"{field}": "..."}}]') from None
    for i, obj in enumerate(rows):
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise _no_field(f"{path}: item {i} of the array has", obj, field)
        yield obj[field]


def _no_field(where: str, obj, field: str) -> QuantcError:
    """A document without the text field: what it has instead, and the key that names the field."""
    has = f" (it has {', '.join(map(repr, list(obj)[:5]))})" if isinstance(obj, dict) and obj else ""
    return QuantcError(f"{where} no string field {field!r}{has}; set calibration.text_field")


def _jsonl_docs(path: Path, field: str):
    with path.open(encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuantcError(f"{path}:{i}: not valid JSON ({e.msg}); calibration.source takes JSON Lines, "
                                  "one object per line (or, in a .json file, one array of objects)") from None
            if isinstance(obj, list):
                raise QuantcError(f"{path}:{i}: a JSON array; quantc reads JSON Lines: one object per line, "
                                  f'such as {{"{field}": "..."}}')
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise _no_field(f"{path}:{i}:", obj, field)
            yield obj[field]


def _hf_docs(source: str, field: str):
    try:
        import datasets
    except ImportError:
        raise QuantcError("calibration.source hf:... needs the `datasets` package: pip install datasets") from None
    parts = source[3:].split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), \
        (parts[2] if len(parts) > 2 else "train")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # network, unknown dataset: one clear message
        raise QuantcError(f"calibration.source {source!r}: cannot load the dataset ({e})") from None
    for i, row in enumerate(ds):
        if not isinstance(row.get(field), str):
            raise _no_field(f"calibration.source {source!r}: row {i} has", row, field)
        yield row[field]


def windows_from_docs(docs, tokenizer, samples: int, seq_len: int, seed: int, where: str,
                      more: int = 0) -> torch.Tensor:
    """Documents with at least seq_len tokens, in order; one random window from each: `samples` of
    them, and up to `more` after them while documents last (the held-out check's)."""
    rng = random.Random(seed)
    out = []
    for text in docs:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < seq_len:
            continue
        start = rng.randint(0, len(ids) - seq_len)
        out.append(ids[start:start + seq_len])
        if len(out) == samples + more:
            break
    if not out:
        raise QuantcError(f"{where}: no document has {seq_len} tokens; lower calibration.seq_len or add text")
    if len(out) < samples:
        log.warning("%s: only %d documents have %d tokens; calibrating on %d samples instead of %d",
                    where, len(out), seq_len, len(out), samples)
    return torch.tensor(out, dtype=torch.int64)


def windows_from_text(text: str, tokenizer, samples: int, seq_len: int, seed: int, where: str,
                      more: int = 0) -> torch.Tensor:
    """`samples` random windows of the text, then up to `more` (the held-out check's) that overlap none
    of them nor each other, drawn on from the same generator: the first `samples` rows do not depend on `more`. A
    text with no room left between the calibration's windows gives fewer check rows, or none."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < seq_len:
        raise QuantcError(f"{where}: the calibration text has {len(ids)} tokens, shorter than one sequence "
                          f"of {seq_len}; add text or lower calibration.seq_len")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seq_len) for _ in range(samples)]
    taken = sorted(starts)
    held = []
    for _ in range(CHECK_TRIES * more):
        if len(held) == more:
            break
        s = rng.randint(0, len(ids) - seq_len)
        k = bisect.bisect(taken, s)          # the calibration windows starting nearest below and above s
        if (k == 0 or s - taken[k - 1] >= seq_len) and (k == len(taken) or taken[k] - s >= seq_len):
            held.append(s)
            bisect.insort(taken, s)          # nor another check window
    return torch.tensor([ids[s:s + seq_len] for s in starts + held], dtype=torch.int64).reshape(-1, seq_len)


CHECK_TRIES = 64        # random starts tried per check window of a .txt source before it gives up


def self_tokens(cal, tokenizer, model, device: torch.device | None, identity: str, folder: Path) -> torch.Tensor:
    """`calibration.source: self` tokens, sampled once per model (`identity`: model.source_identity)
    and calibration settings and kept in `folder`: a run again (a resume, whose keys hash the tokens)
    starts from the same tokens, whichever device sampled them, and does not pay for sampling twice."""
    import hashlib
    key = hashlib.sha256(f"{identity}:{cal.samples}:{cal.seq_len}:{cal.seed}".encode()).hexdigest()[:20]
    path = folder / f"self-{key}.pt"
    if path.is_file():
        try:
            t = torch.load(path, weights_only=True)
            if tuple(t.shape) == (cal.samples, cal.seq_len):
                log.info("calibration: the tokens sampled from this model before (%s)", path)
                return t
        except Exception as e:         # unreadable: sample again
            log.warning("%s: cannot read the sampled calibration tokens (%s); sampling again", path, e)
    t = calibration_tokens(cal, tokenizer, model, device)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        durable.write(path, lambda tmp: torch.save(t, tmp))
    except OSError as e:
        log.warning("%s: cannot keep the sampled calibration tokens (%s); a run again samples again", path, e)
    return t


SAMPLING_BATCH = 16          # sequences sampled together (sample_from_model)


def sampling_device(model, device: torch.device | None, cal) -> torch.device:
    """Where `calibration.source: self` samples: on a GPU compile, the GPU when the whole model (as
    loaded, float32) and the sampling's KV cache and logits fit in its free memory; else the CPU,
    with a warning, since one decode step per token of a 7B+ model on a CPU takes hours for the
    default 128×512 tokens. The random draws stay on the CPU, so a device changes only the logits'
    rounding."""
    if device is None or device.type != "cuda":
        return torch.device("cpu")
    mc = model.config
    heads = getattr(mc, "num_attention_heads", 1) or 1
    kv = (getattr(mc, "num_key_value_heads", None) or heads) * (getattr(mc, "head_dim", None)
                                                                 or mc.hidden_size // heads)
    batch = min(SAMPLING_BATCH, cal.samples)
    need = (sum(p.numel() * p.element_size() for p in model.parameters())
            + 2 * batch * cal.seq_len * mc.num_hidden_layers * kv * 4            # keys and values, float32
            + 4 * batch * mc.vocab_size * 4 + (1 << 30))                         # logits, softmax; 1 GiB slack
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        log.warning("calibration.source self: the model needs %.1f GiB on %s to sample its calibration text and "
                    "%.1f GiB are free; sampling on the CPU (slow for large models: give a text file as "
                    "calibration.source instead)", need / 2**30, device, free / 2**30)
        return torch.device("cpu")
    return device


@contextlib.contextmanager
def _placed(model, device: torch.device):
    """The model on `device` for the with-block, back on the CPU after, and the device's cached
    blocks returned (the measurement then sizes its activations by the free memory). The CPU: nothing
    moves."""
    if device.type == "cpu":
        yield
        return
    try:
        model.to(device)
        yield
    finally:
        model.to("cpu")
        torch.cuda.empty_cache()


@torch.no_grad()
def sample_from_model(model, samples: int, seq_len: int, seed: int,
                      batch_size: int = SAMPLING_BATCH) -> torch.Tensor:
    """Data-free calibration (as in LLM-QAT): start from a random token, then sample the model's own
    next-token distribution. Slow-ish (one decode step per token) but needs no data at all. Runs where
    the model is; the random draws run on the CPU (one generator, whatever the device)."""
    from tqdm.auto import tqdm
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    dev = next(model.parameters()).device
    out = []
    for b in tqdm(range(0, samples, batch_size), desc="sampling calibration text", leave=False):
        n = min(batch_size, samples - b)
        ids = torch.randint(0, vocab, (n, 1), generator=g)
        past = None
        for _ in range(seq_len - 1):
            o = model(input_ids=(ids[:, -1:] if past is not None else ids).to(dev), past_key_values=past,
                      use_cache=True)
            past = o.past_key_values
            probs = torch.softmax(o.logits[:, -1].float(), -1).cpu()
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
        out.append(ids)
    return torch.cat(out)
