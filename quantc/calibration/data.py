"""Calibration sequences: N windows of `seq_len` tokens, reproducible from a seed.

Sources: a .jsonl file (one JSON object per line with a text field), a .txt file, a Hugging Face
dataset (`hf:name[:config[:split]]`, needs the `datasets` package and network), or `self`:
sequences sampled from the model itself, so a compile needs nothing but the model.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path

import torch

from ..errors import QuantcError

log = logging.getLogger("quantc")


_MEMO: dict = {}     # tokens of a calibration file, by file identity, settings and tokenizer (see preflight)


def _memo_key(cal, tokenizer):
    if cal.source == "self" or cal.source.startswith("hf:"):
        return None
    try:
        st = Path(cal.source).stat()
    except OSError:
        return None
    return (cal.source, st.st_size, st.st_mtime_ns, cal.samples, cal.seq_len, cal.seed, cal.text_field,
            type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))


def check_source(cal) -> None:
    """The calibration source's format, read in full now (a second or two), not after the model has
    loaded: an empty file, a line that is not JSON or lacks the text field, a file that is not UTF-8."""
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
            if not any(text.strip() for text in _jsonl_docs(path, cal.text_field)):
                raise QuantcError(f"{path}: the calibration file has no text (empty, or every {cal.text_field!r} "
                                  "is empty); add documents or use calibration.source: self")
        elif not path.read_text(encoding="utf-8").strip():
            raise QuantcError(f"{path}: the calibration file is empty; add text or use calibration.source: self")
    except UnicodeDecodeError as e:
        raise QuantcError(f"{path}: not a UTF-8 text file (byte {e.start}); save it as UTF-8") from None


def calibration_tokens(cal, tokenizer, model=None, device: torch.device | None = None) -> torch.Tensor:
    """int64 [samples, seq_len] calibration tokens for a `Calibration` config (a file's tokens are
    remembered for the process: the preflight's early check costs the compile nothing). `device`:
    the compile's device, where `self` samples when the model fits there (sampling_device)."""
    key = _memo_key(cal, tokenizer)
    if key is not None and key in _MEMO:
        return _MEMO[key].clone()
    t = _calibration_tokens(cal, tokenizer, model, device)
    if key is not None:
        _MEMO.clear()
        _MEMO[key] = t.clone()
    return t


def check_tokens(cal, tokenizer, model=None, device: torch.device | None = None) -> torch.Tensor:
    """int64 [check_samples, seq_len]: the compile's held-out check sequences, which no pass calibrates
    on (possibly fewer rows, or none, when the source runs out). From a document source (.jsonl, hf:),
    the windows of the `check_samples` documents after the calibration's: the same draw with more
    samples, whose first `samples` rows are the calibration's. From a .txt file, windows drawn the same
    way, which may overlap the calibration's. From `self`, sequences the model samples with the next
    seed (a draw of their own, so the calibration's tokens stay those of a compile without a check)."""
    import dataclasses
    if cal.check_samples < 1:
        return torch.zeros(0, cal.seq_len, dtype=torch.int64)
    if cal.source == "self":
        return calibration_tokens(self_check(cal), tokenizer, model, device)
    more = dataclasses.replace(cal, samples=cal.samples + cal.check_samples)
    with _quiet(log):                 # the calibration's own draw already warned of a short source
        t = _calibration_tokens(more, tokenizer, model, device)
    return t[cal.samples:]


def self_check(cal):
    """The draw of a `self` calibration's check sequences: `check_samples` of them with the next seed."""
    import dataclasses
    return dataclasses.replace(cal, samples=cal.check_samples, seed=cal.seed + 1)


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _calibration_tokens(cal, tokenizer, model=None, device: torch.device | None = None) -> torch.Tensor:
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
        return windows_from_docs(docs, tokenizer, cal.samples, cal.seq_len, cal.seed, cal.source)
    path = Path(cal.source)
    if path.suffix.lower() in (".jsonl", ".json"):
        return windows_from_docs(_jsonl_docs(path, cal.text_field), tokenizer, cal.samples, cal.seq_len,
                                 cal.seed, str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QuantcError(f"{path}: not a UTF-8 text file (byte {e.start}); save it as UTF-8") from None
    return windows_from_text(text, tokenizer, cal.samples, cal.seq_len, cal.seed, str(path))


def _jsonl_docs(path: Path, field: str):
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuantcError(f"{path}:{i}: not valid JSON ({e.msg}); expected one object per line") from None
            if isinstance(obj, list):
                raise QuantcError(f"{path}:{i}: a JSON array; quantc reads JSON Lines: one object per line, "
                                  f'such as {{"{field}": "..."}}')
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                has = f" (it has {', '.join(map(repr, list(obj)[:5]))})" if isinstance(obj, dict) and obj else ""
                raise QuantcError(f"{path}:{i}: no string field {field!r}{has}; set calibration.text_field")
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
    for row in ds:
        yield row[field]


def windows_from_docs(docs, tokenizer, samples: int, seq_len: int, seed: int, where: str) -> torch.Tensor:
    """Documents with at least seq_len tokens, in order; one random window from each."""
    rng = random.Random(seed)
    out = []
    for text in docs:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < seq_len:
            continue
        start = rng.randint(0, len(ids) - seq_len)
        out.append(ids[start:start + seq_len])
        if len(out) == samples:
            break
    if not out:
        raise QuantcError(f"{where}: no document has {seq_len} tokens; lower calibration.seq_len or add text")
    if len(out) < samples:
        log.warning("%s: only %d documents have %d tokens; calibrating on %d samples instead of %d",
                    where, len(out), seq_len, len(out), samples)
    return torch.tensor(out, dtype=torch.int64)


def windows_from_text(text: str, tokenizer, samples: int, seq_len: int, seed: int, where: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < seq_len:
        raise QuantcError(f"{where}: the calibration text has {len(ids)} tokens, shorter than one sequence "
                          f"of {seq_len}; add text or lower calibration.seq_len")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seq_len) for _ in range(samples)]
    return torch.tensor([ids[s:s + seq_len] for s in starts], dtype=torch.int64)


def self_tokens(cal, tokenizer, model, device: torch.device | None, identity: str, folder: Path) -> torch.Tensor:
    """`calibration.source: self` tokens, sampled once per model (`identity`: model.source_identity)
    and calibration settings and kept in `folder`: a run again (a resume, whose keys hash the tokens)
    starts from the same tokens, whichever device sampled them, and does not pay for sampling twice."""
    import hashlib
    import os
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
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(t, tmp)
        os.replace(tmp, path)
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
