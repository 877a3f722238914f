"""`quantc verify`: check an artifact without trusting it. Reads safetensors and JSON only (never
unpickles): the manifest's SHA-256 of every file, no weight file the manifest does not list, every
quantized tensor's shape and dtype against config.json, and (when the source model is present) a
short logits comparison against it."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import QuantcError
from .runtime import module_option


# the GPTQ v1 tensors' dtypes as the exporter writes them (packing.pack_gptq) and runtimes read them
EXPECTED_DTYPES = {"qweight": "I32", "qzeros": "I32", "scales": "F16", "g_idx": "I32"}


def expected_shapes(in_f: int, out_f: int, bits: int, group_size: int) -> dict[str, tuple]:
    gs = in_f if group_size <= 0 else group_size
    groups = -(-in_f // gs)
    return {"qweight": (in_f * bits // 32, out_f), "qzeros": (groups, out_f * bits // 32),
            "scales": (groups, out_f), "g_idx": (in_f,)}


def read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """quantc.json, or None and why it cannot be used (missing, truncated, not a manifest)."""
    p = folder / "quantc.json"
    if not p.is_file():
        return None, "is missing"
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"is not valid JSON, truncated or corrupt ({e})"
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
        return None, "has no `files` table: not a quantc manifest"
    return m, None


def verify(folder: str | Path, logits: bool = True) -> list[tuple[str, bool | None, str]]:
    """Run every check; return (check, ok, detail) rows; ok is None for a check that was skipped."""
    from .pipeline import sha256
    folder = Path(folder)
    rows = []
    if not (folder / "config.json").is_file():
        raise QuantcError(f"{folder}: no config.json; not a checkpoint folder")
    manifest, problem = read_manifest(folder)
    if manifest is None:
        rows.append(("manifest", False, f"quantc.json {problem}: file hashes cannot be checked"))
    else:
        for name, digest in manifest["files"].items():
            p = folder / name
            ok = p.is_file() and sha256(p) == digest
            rows.append((f"sha256 {name}", ok, "matches" if ok else ("missing" if not p.is_file() else "differs")))
        stray = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in manifest["files"])
        rows.append(("weight files", not stray, "every .safetensors is the manifest's" if not stray else
                     f"not in the manifest: {', '.join(stray[:5])} (a file left from another checkpoint: a reader "
                     "without the index would take its tensors)"))

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise QuantcError(f"{folder}/config.json: not valid JSON ({e}); the checkpoint is damaged") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not qc:
        raise QuantcError(f"{folder}/config.json: no quantization_config")
    bad, count = [], 0
    shapes = (manifest or {}).get("modules") or {}
    from .model import weight_files
    try:
        files = weight_files(folder)
    except QuantcError as e:          # an index naming a file that is gone, or no index at all: say so, go on
        rows.append(("weight index", False, str(e)))
        files = sorted(folder.glob("*.safetensors"))
    meta: dict[str, tuple[tuple, str]] = {}       # every tensor's shape and dtype, from the headers alone:
    for f in files:                                 # a module's tensors may lie in different shards
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    meta[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:
            rows.append((f"read {f.name}", False, f"cannot read safetensors: {e}"))
    for qname in sorted(k[: -len(".qweight")] for k in meta if k.endswith(".qweight")):
        opt = module_option(qname, qc)
        if opt is None:
            bad.append(f"{qname}: packed but excluded by `dynamic`")
            continue
        mod = shapes.get(qname)
        if mod is not None:
            in_f, out_f = mod["in"], mod["out"]
        elif f"{qname}.g_idx" in meta and f"{qname}.scales" in meta:   # no manifest: from the g_idx and scales
            in_f, out_f = meta[f"{qname}.g_idx"][0][0], meta[f"{qname}.scales"][0][1]
        else:
            bad.append(f"{qname}: no g_idx or scales beside its qweight")
            continue
        for part, shape in expected_shapes(in_f, out_f, int(opt["bits"]), int(opt["group_size"])).items():
            key = f"{qname}.{part}"
            got, dt = meta.get(key, (None, None))
            if got != shape:
                bad.append(f"{key}: shape {got}, expected {shape}")
            elif dt != EXPECTED_DTYPES[part]:
                bad.append(f"{key}: dtype {dt}, expected {EXPECTED_DTYPES[part]}")
        count += 1
    for qname in sorted(k[: -len(".qblocks")] for k in meta if k.endswith(".qblocks")):
        opt, mod = module_option(qname, qc), shapes.get(qname)
        got = meta[f"{qname}.qblocks"][0]
        if opt is None or opt.get("grid", "gptq") == "gptq":
            bad.append(f"{qname}: llama.cpp blocks but no llama.cpp grid in config.json")
            continue
        if mod is not None:   # [out, in / block, block bytes] of the type the linear gets
            from .ggml import type_for
            t = type_for(opt["grid"], int(opt["bits"]), bool(opt["sym"]), mod["in"], qname)
            if got != (mod["out"], mod["in"] // t.block, t.size):
                bad.append(f"{qname}.qblocks: shape {got}, expected {t.name} blocks "
                           f"{(mod['out'], mod['in'] // t.block, t.size)}")
        count += 1
    rows.append(("tensor shapes", not bad and count > 0,
                 f"{count} quantized linears consistent with config.json" if not bad else "; ".join(bad[:5])))

    source = (manifest or {}).get("source") or {}
    src = source.get("model")
    if logits and src and Path(src).is_dir() and all(ok for _, ok, _ in rows):
        allow_pickle = bool(((manifest or {}).get("config") or {}).get("allow_pickle", False))
        try:
            rows.append(_logits_check(folder, src, source.get("gguf_file"), allow_pickle))
        except QuantcError as e:
            rows.append(("logits vs source", False, f"cannot run: {e}"))
    elif logits:
        why = ("source model unknown (no usable quantc.json)" if not src else
               f"source model {src} not present locally" if not Path(src).is_dir() else "earlier checks failed")
        rows.append(("logits vs source", None, f"skipped: {why}"))
    return rows


@torch.no_grad()
def _logits_check(folder: Path, src: str, gguf_file: str | None, allow_pickle: bool = False) -> tuple[str, bool, str]:
    from .model import load_model, load_tokenizer
    from .runtime import load
    tok = load_tokenizer(str(folder))
    text = "The quick brown fox jumps over the lazy dog. Quantization maps weights to a few bits " * 4
    ids = torch.tensor([tok(text)["input_ids"][:64]])
    q = load(folder)(input_ids=ids).logits
    ref = load_model(src, gguf_file, allow_pickle=allow_pickle)(input_ids=ids).logits
    rel = float((q - ref).norm() / ref.norm())
    agree = float((q.argmax(-1) == ref.argmax(-1)).float().mean())
    ok = rel < 0.5 and torch.isfinite(q).all()
    return ("logits vs source", bool(ok), f"relative error {rel:.4f}, top-1 agreement {agree:.1%} on {ids.shape[1]} tokens")
