"""`quantc` command line: parse, call the pipeline, print. Errors become one line and exit code 2."""
from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from functools import wraps
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .errors import QuantcError

console = Console(stderr=False)
err_console = Console(stderr=True)


def _notes(e: BaseException) -> str:
    """What the staging added (where a resume point is kept), on the same line."""
    return "".join(f"; {n}" for n in getattr(e, "__notes__", None) or [])


def _where() -> str:
    """` (rank 1 of 2)` in a distributed run: which process says it."""
    import os
    from .distributed import launched, launched_rank
    return f" (rank {launched_rank()} of {os.environ['WORLD_SIZE']})" if launched() else ""


def _peer_lost(e: Exception) -> bool:
    """A collective failed because another rank is gone (its own error is the one to read)."""
    from .distributed import launched
    text = f"{type(e).__name__} {e}"
    return launched() and any(w in text for w in ("DistBackendError", "DistNetworkError", "Connection closed",
                                                  "Connection reset", "gloo", "NCCL"))


def _fail_clearly(fn):
    """QuantcError → one line and exit 2; Ctrl-C → one line (with the resume point) and exit 130;
    anything else → one line and exit 1 (with -v: the traceback)."""
    @wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except QuantcError as e:
            click.echo(f"error{_where()}: {e}{_notes(e)}", err=True)   # one unwrapped line: easy to read and to grep
            sys.exit(2)
        except KeyboardInterrupt as e:
            click.echo(f"error{_where()}: interrupted{_notes(e)}", err=True)
            sys.exit(130)
        except Exception as e:
            if logging.getLogger("quantc").isEnabledFor(logging.DEBUG):
                raise
            if isinstance(e, MemoryError):
                msg = "out of memory; lower calibration.samples or calibration.seq_len, or free memory"
            elif _peer_lost(e):
                msg = ("another rank of the distributed run stopped (see its error above), so this one stops "
                       f"too ({type(e).__name__}); run the same command again to resume after the last finished "
                       "layer")
            elif isinstance(e, OSError) and e.strerror:
                msg = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
            else:
                first = str(e).splitlines()[0] if str(e) else ""
                msg = (f"unexpected {type(e).__name__}{': ' + first if first else ''} "
                       "(a bug in quantc: run with -v for the traceback and report it)")
            click.echo(f"error{_where()}: {msg}{_notes(e)}", err=True)
            sys.exit(1)
    return wrapper


class _OursFirst(logging.Filter):
    """Let quantc's records through at their level, and third-party ones only from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] == "quantc" or record.levelno >= logging.ERROR


def _setup_logging(level: int, verbose: bool) -> None:
    """quantc's own lines at `level`; third-party import noise (torchao's optional libraries that fail
    to load, torch's deprecation notes, transformers' advice) silenced unless -v, so the first screen
    is quantc's. quantc's warnings stay visible."""
    root = logging.getLogger()
    if not any(getattr(h, "_quantc", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler._quantc = True
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if not verbose
                                               else "%(levelname)s %(name)s: %(message)s"))
        if not verbose:
            handler.addFilter(_OursFirst())
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("quantc").setLevel(level)
    if verbose:
        return
    import torch  # noqa: F401  (torch configures its own loggers on import: quiet them after that)
    for noisy in ("torch", "torchao", "transformers", "accelerate", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")                               # third-party warnings.warn ...
    warnings.filterwarnings("default", module=r"quantc(\.|$)")      # ... but never quantc's own


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, warnings only.")
@click.version_option(package_name="quantc")
@click.pass_context
def main(ctx, verbose, quiet):
    """quantc: mixed-precision post-training quantization compiler for LLMs."""
    from .distributed import launched_rank
    if launched_rank() > 0:        # torchrun: rank 0 speaks for the run; the others only warn
        quiet = True
    _setup_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO, verbose)
    if quiet:                      # transformers' own "Loading weights" bars too
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    _terminate_like_ctrl_c()
    ctx.obj = {"progress": not quiet, "quiet": quiet}


def _terminate_like_ctrl_c() -> None:
    """`kill PID` (SIGTERM) ends a command as Ctrl-C does: cleanup, the resume point named, exit 130.
    Both are counted (errors.note_interrupt), so that a read the signal broke inside a library is
    reported as the interrupt, not as a damaged file."""
    import signal
    import threading
    from .errors import note_interrupt

    def on_signal(signum, frame):
        note_interrupt()
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)


@main.command("compile")
@click.argument("budget", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False), help="Use this (edited) plan file.")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@click.pass_context
@_fail_clearly
def compile_cmd(ctx, budget, out, plan_file, force):
    """Quantize the model of BUDGET (a budget YAML) into a GPTQ checkpoint folder."""
    from .config import load_config
    from .pipeline import compile_model
    cfg = load_config(budget)
    if not ctx.obj["quiet"]:        # quantc's own first line, before any library prints its progress
        from . import __version__
        what = "plan + quantize" if not cfg.uniform else "quantize"
        click.echo(f"quantc {__version__}: {what} {cfg.model}{' (' + cfg.gguf_file + ')' if cfg.gguf_file else ''} "
                   f"→ {out}", err=True)
    m = compile_model(cfg, out, force=force, plan_file=plan_file, progress=ctx.obj["progress"])
    from .distributed import leave
    leave()                         # every rank, once rank 0 has written the artifact
    if m is None:                   # a distributed run's other ranks: rank 0 wrote the artifact
        return
    t = m["totals"]
    if not ctx.obj["quiet"]:
        _print_summary(m, out)
    else:
        click.echo(f"{out}: {t['modules']} linears, {t['avg_bits']:.3f} bits/weight")


def _rotation_line(rot: dict) -> str:
    untied = f"; untied lm_head {rot['untied_lm_head_bytes'] / 2**20:.2f} MiB (16-bit; a budget pays for it)" \
        if rot.get("untied_lm_head_bytes") else ""
    return f"{rot['kind']} (seed {rot['seed']}, R1 {rot['r1']}, R2 {rot['r2']}){untied}"


def _check_line(c: dict) -> str:
    line = (f"KL to the original model {c['kl']:.4f} nats/token, Δloss {c['delta_loss']:+.4f} "
            f"({c['sequences']} held-out sequences, {c['positions']:,} positions)")
    if c.get("predicted_delta_kl"):
        line += f"; the plan predicted ΔKL {c['predicted_delta_kl']:.4f} (measured / predicted " \
                f"{c['kl'] / c['predicted_delta_kl']:.2f})"
    return line


def _print_summary(m: dict, out) -> None:
    t = m["totals"]
    table = Table(title=f"quantc compile → {out}", show_header=False)
    table.add_row("model", str(m["source"]["model"]))
    table.add_row("quantized linears", f"{t['modules']} (kept 16-bit: {t['skipped']})")
    table.add_row("quantized-linear bytes", f"{t['quantized_linear_bytes'] / 2**20:.2f} MiB")
    table.add_row("average bits/weight", f"{t['avg_bits']:.3f}")
    if m.get("rotation"):
        table.add_row("rotation", _rotation_line(m["rotation"]))
    if m.get("check"):
        table.add_row("held-out check", _check_line(m["check"]))
    for k, v in m["timings"].items():
        table.add_row(k, f"{v:.1f} s")
    console.print(table)


@main.command("plan")
@click.argument("budget", type=click.Path(dir_okay=False))
@click.option("-o", "--out", default="plan", show_default=True, type=click.Path(file_okay=False),
              help="Folder for plan.yaml and the report (table + PNG plots).")
@click.option("--avg-bits", type=float, help="Override the YAML's budget: bits per weight.")
@click.option("--memory", help="Override the YAML's budget: bytes such as 48MiB.")
@click.pass_context
@_fail_clearly
def plan_cmd(ctx, budget, out, avg_bits, memory):
    """Measure (or read the cached measurement) and allocate bits per unit under the budget."""
    import time
    from .config import Budget, load_config, parse_size
    from .pipeline import plan_only
    from .report import write_report
    from .staging import check_writable
    cfg = load_config(budget)
    check_writable(out, "plan folder")             # written after the measurement: check it now
    if avg_bits is not None and memory is not None:
        raise QuantcError("give one of --avg-bits or --memory, not both")
    if avg_bits is not None and not 0 < avg_bits <= 16:
        raise QuantcError(f"--avg-bits must be in (0, 16], got {avg_bits:g}")
    if avg_bits is not None or memory is not None:
        cfg.budget = Budget(avg_bits=avg_bits, memory=parse_size(memory, "", "--memory") if memory else None)
    if cfg.uniform:
        raise QuantcError(f"{budget}: `budget` is missing; give budget.avg_bits, budget.memory or "
                          "budget.max_delta_loss (or --avg-bits/--memory)")
    t = time.perf_counter()
    import os
    import shutil
    # resources.offload_activations: the measurement's hidden states in unlinked files inside the plan
    # folder (checked writable above; one folder per process of a torchrun run), removed when it ends
    offload = Path(out) / f".offload-{os.getpid()}"
    try:
        plan, ms, cached, solve_s = plan_only(cfg, progress=ctx.obj["progress"], offload=offload,
                                              budget_key="--avg-bits" if avg_bits is not None else
                                              "--memory" if memory else None)
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    from .distributed import current, leave
    if not current().main:          # a distributed run's other ranks: rank 0 writes the plan
        leave()
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    plan.save(folder / "plan.yaml")
    files = write_report(folder, plan, ms, cfg)
    leave()
    p = plan.predicted
    table = Table(title=f"quantc plan → {folder / 'plan.yaml'}", show_header=False)
    table.add_row("measurement", f"{'cached' if cached else 'measured'} ({ms.meta.get('seconds', 0):.0f} s when measured)")
    table.add_row("solve", f"{solve_s * 1000:.0f} ms (DP grid {p['dp_quantum_bytes']} bytes)")
    table.add_row("predicted size", f"{p['bytes']:,} bytes ({p['bytes'] / 2**20:.2f} MiB), {p['avg_bits']:.3f} bits/weight")
    # the measurement quantizes each unit alone on the original model's inputs: error propagation, which
    # corrects each layer for the error before it, is not in the prediction (RESULTS.md: bench_mixed's KL check)
    table.add_row("predicted ΔKL", f"{p['delta_kl']:.4f} nats/token"
                  + (" (plain GPTQ's: QEP, quant.qep_alpha, usually lowers it)" if cfg.qep_alpha > 0 else "")
                  + ("; the compile measures the real one on held-out text" if cfg.calibration.check_samples
                     and cfg.method != "rtn" else ""))
    bits = {}
    for o in plan.choices.values():
        bits[o.bits] = bits.get(o.bits, 0) + 1
    table.add_row("units per bit-width", ", ".join(f"{b}-bit: {n}" for b, n in sorted(bits.items())))
    table.add_row("report", ", ".join(f.name for f in files))
    table.add_row("total time", f"{time.perf_counter() - t:.1f} s")
    console.print(table)


@main.command("eval")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--text", required=True, type=click.Path(exists=True, dir_okay=False), help="Evaluation text file.")
@click.option("--join-lines", is_flag=True, help="Join non-empty lines with a blank line (WikiText files).")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--windows", default=80, show_default=True, type=click.IntRange(min=0), help="Number of windows (0 = all).")
@click.option("--reference", type=click.Path(), help="Original model for KL (default: the compile's source).")
@click.option("--no-kl", is_flag=True, help="Skip the KL divergence against the original model.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results here.")
@click.option("--backend", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="torch: quantc.load; onnx: ONNX Runtime on ARTIFACT/onnx (or ARTIFACT itself).")
@click.pass_context
@_fail_clearly
def eval_cmd(ctx, artifact, text, join_lines, seq_len, windows, reference, no_kl, json_out, backend):
    """Perplexity of ARTIFACT on a text file, and KL against the original model."""
    from .evaluate import eval_tokens, evaluate, read_text
    from .model import load_model, load_tokenizer
    from .runtime import load
    from .staging import check_writable

    if reference and no_kl:
        raise QuantcError("--reference has no effect with --no-kl; give one of them")
    if reference and backend == "onnx":
        raise QuantcError("--reference has no effect with --backend onnx (it reports perplexity only)")
    if json_out:
        check_writable(json_out, "--json file")        # written after the evaluation: check it now
    if backend == "onnx":
        from .ort import OrtModel, evaluate_onnx, onnx_folder
        om = OrtModel(artifact)
        tokens = eval_tokens(read_text(text, join_lines), load_tokenizer(str(onnx_folder(artifact))), seq_len,
                             windows or None)
        res = evaluate_onnx(om, tokens.numpy(), progress=ctx.obj["progress"])
        res["artifact"] = str(artifact)
        table = Table(title=f"quantc eval --backend onnx {artifact}")
        for k in ("ppl", "windows", "tokens", "providers"):
            table.add_column(k)
        table.add_row(f"{res['ppl']:.4f}", str(res["windows"]), str(res["tokens"]), ", ".join(res["providers"]))
        console.print(table)
        if json_out:
            Path(json_out).write_text(json.dumps(res, indent=2))
        click.echo(json.dumps(res))
        return
    ref_path, ref_kw = None, {}
    if not no_kl:                       # the reference is found (or not) before anything loads
        m = {} if reference else _manifest(artifact)
        src = m.get("source") or {}
        ref_path = reference or src.get("model")
        if reference and not Path(reference).exists() and (reference.startswith((".", "/", "~"))
                                                           or not _looks_like_hub_id(reference)):
            raise QuantcError(f"--reference {reference}: no such folder (nor a hub id like org/name)")
        if ref_path and not (Path(ref_path).is_dir() or reference):
            ref_path = None
        ref_kw = {"gguf_file": src.get("gguf_file") if not reference else None,
                  "allow_pickle": bool((m.get("config") or {}).get("allow_pickle", False))}   # as the compile was told
    text_ = read_text(text, join_lines)
    model = load(artifact)
    tok = load_tokenizer(artifact)
    tokens = eval_tokens(text_, tok, seq_len, windows or None)
    ref = None
    if ref_path:
        ref = load_model(ref_path, **ref_kw)
    elif not no_kl:
        err_console.print("note: original model not found; KL skipped (pass --reference)")
    res = evaluate(model, tokens, ref, progress=ctx.obj["progress"])
    res["artifact"] = str(artifact)
    table = Table(title=f"quantc eval {artifact}")
    cols = {"ppl": "ppl", "ref_ppl": "reference ppl", "kl": "kl", "windows": "windows", "tokens": "tokens"}
    for k, title in cols.items():
        if k in res:
            table.add_column(title)
    table.add_row(*(f"{res[k]:.4f}" if isinstance(res[k], float) else str(res[k]) for k in cols if k in res))
    console.print(table)
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2))
    click.echo(json.dumps(res))


def _looks_like_hub_id(s: str) -> bool:
    from .config import _HUB_ID
    return bool(_HUB_ID.match(s))


def _manifest(artifact) -> dict:
    """The artifact's quantc.json ({} when there is none); a damaged one is an error, not a traceback."""
    from .verify import read_manifest
    if not (Path(artifact) / "quantc.json").is_file():
        return {}
    m, problem = read_manifest(Path(artifact))
    if m is None:
        raise QuantcError(f"{Path(artifact) / 'quantc.json'} {problem}; run `quantc verify {artifact}`")
    return m


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise QuantcError(f"{path}: not valid JSON ({e}); the folder is damaged") from None
    if not isinstance(d, dict):
        raise QuantcError(f"{path}: not a JSON object; the folder is damaged")
    return d


@main.group("export")
def export_group():
    """Export a compiled artifact to another format."""


@export_group.command("onnx")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", type=click.Path(file_okay=False), help="Output folder (default: ARTIFACT/onnx).")
@click.option("--accuracy-level", default=0, show_default=True, type=click.IntRange(0, 4),
              help="MatMulNBits accuracy_level (0: float compute; 4: int8 activations, faster on CPU).")
@click.option("--max-length", type=click.IntRange(min=1), help="Longest sequence (RoPE table size; default: the model's, ≤ 8192).")
@click.option("--widen-2bit", is_flag=True,
              help="Store 2-bit layers in the 4-bit container (exact; larger file, ONNX Runtime's fast 4-bit CPU path).")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@_fail_clearly
def export_onnx_cmd(artifact, out, accuracy_level, max_length, widen_2bit, force):
    """ONNX Runtime model (MatMulNBits per quantized linear, KV cache) from ARTIFACT."""
    from .export.onnx import export_onnx
    out = out or str(Path(artifact) / "onnx")
    info = export_onnx(artifact, out, accuracy_level=accuracy_level, max_length=max_length, force=force,
                       widen_2bit=widen_2bit)
    bits: dict[int, int] = {}
    for m in info["matmulnbits"].values():
        bits[m["bits"]] = bits.get(m["bits"], 0) + 1
    table = Table(title=f"quantc export onnx → {out}", show_header=False)
    table.add_row("MatMulNBits", ", ".join(f"{b}-bit: {n}" for b, n in sorted(bits.items())) or "none")
    table.add_row("float MatMul", str(len(info["matmul"])))
    if info["container_4bit"]:
        table.add_row("in a 4-bit container", f"{len(info['container_4bit'])} linears of 3 (or widened 2) bits "
                      "(exact values, 4-bit storage)")
    table.add_row("graph", "input_ids, attention_mask, position_ids, past_key_values.* → logits, present.*")
    table.add_row("files", ", ".join(sorted(p.name for p in Path(out).iterdir())))
    console.print(table)


@export_group.command("gguf")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", type=click.Path(file_okay=False), help="Output folder (default: ARTIFACT/gguf).")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@click.option("--heads", type=click.Choice(["llama", "f16"]), default=None,
              help="Embeddings/output: llama.cpp's quantizer types (when the linears are on llama.cpp grids) or "
                   "F16 [default: the compile's export.gguf_heads, else llama]")
@_fail_clearly
def export_gguf_cmd(artifact, out, force, heads):
    """llama.cpp GGUF from ARTIFACT: Q4_0 / Q4_1 / Q8_0 from GPTQ-grid integers, llama.cpp-grid linears
    (K-quants, Q5_0/Q5_1...) as the blocks the compile chose."""
    from .export.gguf import export_gguf
    out = out or str(Path(artifact) / "gguf")
    manifest = _manifest(artifact)
    src = manifest.get("source", {})
    source = str(Path(src["model"]) / src["gguf_file"]) if src.get("model") and src.get("gguf_file") else None
    saved = (manifest.get("config") or {}).get("export") or {}
    heads = heads or saved.get("gguf_heads", "llama")
    info = export_gguf(artifact, out, source_gguf=source, force=force, heads=heads, pre=saved.get("gguf_pre"))
    table = Table(title=f"quantc export gguf → {out}", show_header=False)
    table.add_row("quantized tensors", ", ".join(f"{t}: {n}" for t, n in sorted(info["types"].items())) or "none")
    table.add_row("file", str(Path(out) / info["file"]))
    console.print(table)


@main.command("generate")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("-p", "--prompt", required=True, help="Text to continue.")
@click.option("-n", "--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--backend", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@_fail_clearly
def generate_cmd(artifact, prompt, max_new_tokens, backend, chat):
    """Greedy text generation from ARTIFACT with either backend."""
    import time
    from .model import load_tokenizer
    if not prompt.strip() and not chat:
        raise QuantcError("the prompt is empty; give some text with -p")
    tok_dir = artifact
    if backend == "onnx":
        from .ort import OrtModel, onnx_folder
        om = OrtModel(artifact)
        tok_dir = str(onnx_folder(artifact))
    tok = load_tokenizer(tok_dir)
    if chat and not getattr(tok, "chat_template", None):
        logging.getLogger("quantc").warning("--chat: the tokenizer of %s has no chat template; the prompt is "
                                            "used as it is", tok_dir)
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids       # BatchEncoding in transformers 5
    else:
        ids = tok(prompt)["input_ids"]
    t = time.perf_counter()
    if backend == "onnx":
        out = om.generate(ids, max_new_tokens, tok.eos_token_id)
        where = ", ".join(om.providers)
    else:
        from .ort import generate_torch
        from .runtime import load
        out = generate_torch(load(artifact), ids, max_new_tokens, tok.eos_token_id)
        where = "torch"
    dt = time.perf_counter() - t
    click.echo(prompt + tok.decode(out, skip_special_tokens=True))
    err_console.print(f"[dim]{len(out)} tokens in {dt:.2f} s ({backend}: {where})[/]")


@main.command("inspect")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--modules", is_flag=True, help="List every module, not one row per layer.")
@_fail_clearly
def inspect_cmd(artifact, modules):
    """Bits per module, size and provenance of a compiled ARTIFACT."""
    cfgp = Path(artifact) / "config.json"
    if not cfgp.is_file():
        raise QuantcError(f"{artifact}: no config.json; not a checkpoint folder")
    qc = _read_json(cfgp).get("quantization_config")
    if not qc:
        raise QuantcError(f"{cfgp}: no quantization_config; not a quantized checkpoint")
    m = _manifest(artifact)
    prov = qc.get("meta", {}).get("quantizer", ["?"])
    console.print(f"[bold]{artifact}[/]  quantizer: {', '.join(prov)}  default: {qc['bits']}-bit "
                  f"g{qc['group_size']} {'sym' if qc.get('sym') else 'asym'} desc_act={qc.get('desc_act')}")
    if not isinstance(m.get("modules"), dict) or not isinstance(m.get("totals"), dict):
        console.print(f"dynamic overrides: {len(qc.get('dynamic') or {})}")
        return
    mods = m["modules"]
    table = Table(title="bits per module")
    if modules:
        for c in ("module", "bits", "group", "sym", "bytes"):
            table.add_column(c)
        for n, o in mods.items():
            table.add_row(n, str(o["bits"]), str(o["group_size"]), str(o["sym"]), f"{o['bytes']:,}")
    else:
        # module names are <layers path>.<i>.<name inside the layer> (quantc/family.py)
        parts = {n: re.match(r"^(.*?)\.(\d+)\.(.+)$", n).groups() for n in mods}
        short = sorted({s for _, _, s in parts.values()})
        table.add_column("layer")
        for s in short:
            table.add_column(s.rsplit(".", 1)[-1])
        by_pos = {(int(i), s): mods[n] for n, (_, i, s) in parts.items()}
        for i in sorted({i for i, _ in by_pos}):
            row = [str(i)]
            for s in short:
                o = by_pos.get((i, s))
                row.append(f"{o['bits']}" if o else "16")
            table.add_row(*row)
    console.print(table)
    t = m["totals"]
    console.print(f"quantized linears: {t['modules']}, kept 16-bit: {t['skipped']}, "
                  f"bytes {t['quantized_linear_bytes']:,} ({t['quantized_linear_bytes'] / 2**20:.2f} MiB), "
                  f"{t['avg_bits']:.3f} bits/weight; compiled by quantc {m.get('quantc')} "
                  f"from {m['source']['model']} in {m['timings'].get('total_s', 0):.0f} s")
    if isinstance(m.get("rotation"), dict):
        console.print(f"rotation: {_rotation_line(m['rotation'])}")
    if isinstance(m.get("check"), dict):
        console.print(f"held-out check: {_check_line(m['check'])}")


@main.command("verify")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--no-logits", is_flag=True, help="Skip the logits comparison against the source model.")
@click.option("--strict", is_flag=True, help="A check that could not run (skipped) fails the verification.")
@_fail_clearly
def verify_cmd(artifact, no_logits, strict):
    """Check ARTIFACT: file hashes, tensor shapes against its config, logits against the source."""
    from .verify import verify
    rows = verify(artifact, logits=not no_logits)
    table = Table(title=f"quantc verify {artifact}")
    for c in ("check", "result", "detail"):
        table.add_column(c)
    for name, ok, detail in rows:
        table.add_row(name, "[yellow]skipped[/]" if ok is None else "[green]ok[/]" if ok else "[red]FAIL[/]", detail)
    console.print(table)
    skipped = [name for name, ok, _ in rows if ok is None]
    if any(ok is False for _, ok, _ in rows):
        click.echo(f"error: {artifact} failed verification", err=True)
        sys.exit(1)
    if skipped and strict:
        click.echo(f"error: {artifact}: not verified: {', '.join(skipped)} skipped (--strict)", err=True)
        sys.exit(1)
    if skipped:
        click.echo(f"note: {', '.join(skipped)} skipped; pass --strict to fail on skipped checks", err=True)


if __name__ == "__main__":
    main()
