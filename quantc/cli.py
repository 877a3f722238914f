"""`quantc` command line: parse, call the pipeline, print. Errors become one line and exit code 2."""
from __future__ import annotations

import json
import logging
import sys
from functools import wraps
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .errors import QuantcError

console = Console(stderr=False)
err_console = Console(stderr=True)


def _fail_clearly(fn):
    @wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except QuantcError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(2)
    return wrapper


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, warnings only.")
@click.version_option(package_name="quantc")
@click.pass_context
def main(ctx, verbose, quiet):
    """quantc: mixed-precision post-training quantization compiler for LLMs."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    logging.getLogger("quantc").setLevel(level)
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    ctx.obj = {"progress": not quiet, "quiet": quiet}


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
    m = compile_model(cfg, out, force=force, plan_file=plan_file, progress=ctx.obj["progress"])
    t = m["totals"]
    if not ctx.obj["quiet"]:
        _print_summary(m, out)
    else:
        click.echo(f"{out}: {t['modules']} linears, {t['avg_bits']:.3f} bits/weight")


def _print_summary(m: dict, out) -> None:
    t = m["totals"]
    table = Table(title=f"quantc compile → {out}", show_header=False)
    table.add_row("model", str(m["source"]["model"]))
    table.add_row("quantized linears", f"{t['modules']} (kept 16-bit: {t['skipped']})")
    table.add_row("quantized-linear bytes", f"{t['quantized_linear_bytes'] / 2**20:.2f} MiB")
    table.add_row("average bits/weight", f"{t['avg_bits']:.3f}")
    for k, v in m["timings"].items():
        table.add_row(k, f"{v:.1f} s")
    console.print(table)


@main.command("eval")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--text", required=True, type=click.Path(exists=True, dir_okay=False), help="Evaluation text file.")
@click.option("--join-lines", is_flag=True, help="Join non-empty lines with a blank line (WikiText files).")
@click.option("--seq-len", default=512, show_default=True)
@click.option("--windows", default=80, show_default=True, help="Number of windows (0 = all).")
@click.option("--reference", type=click.Path(), help="Original model for KL (default: the compile's source).")
@click.option("--no-kl", is_flag=True, help="Skip the KL divergence against the original model.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results here.")
@click.pass_context
@_fail_clearly
def eval_cmd(ctx, artifact, text, join_lines, seq_len, windows, reference, no_kl, json_out):
    """Perplexity of ARTIFACT on a text file, and KL against the original model."""
    from .evaluate import eval_tokens, evaluate, read_text
    from .model import load_model, load_tokenizer
    from .runtime import load

    model = load(artifact)
    tok = load_tokenizer(artifact)
    tokens = eval_tokens(read_text(text, join_lines), tok, seq_len, windows or None)
    ref = None
    if not no_kl:
        src = _manifest(artifact).get("source", {})
        path = reference or src.get("model")
        if path and (Path(path).is_dir() or reference):
            ref = load_model(path, src.get("gguf_file") if not reference else None)
        else:
            err_console.print("note: original model not found; KL skipped (pass --reference)")
    res = evaluate(model, tokens, ref, progress=ctx.obj["progress"])
    res["artifact"] = str(artifact)
    table = Table(title=f"quantc eval {artifact}")
    for k in ("ppl", "kl", "windows", "tokens"):
        if k in res:
            table.add_column(k)
    table.add_row(*(f"{res[k]:.4f}" if isinstance(res[k], float) else str(res[k])
                    for k in ("ppl", "kl", "windows", "tokens") if k in res))
    console.print(table)
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2))
    click.echo(json.dumps(res))


def _manifest(artifact) -> dict:
    p = Path(artifact) / "quantc.json"
    return json.loads(p.read_text()) if p.is_file() else {}


@main.command("inspect")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--modules", is_flag=True, help="List every module, not one row per layer.")
@_fail_clearly
def inspect_cmd(artifact, modules):
    """Bits per module, size and provenance of a compiled ARTIFACT."""
    cfgp = Path(artifact) / "config.json"
    if not cfgp.is_file():
        raise QuantcError(f"{artifact}: no config.json; not a checkpoint folder")
    qc = json.loads(cfgp.read_text()).get("quantization_config")
    if not qc:
        raise QuantcError(f"{cfgp}: no quantization_config; not a quantized checkpoint")
    m = _manifest(artifact)
    prov = qc.get("meta", {}).get("quantizer", ["?"])
    console.print(f"[bold]{artifact}[/]  quantizer: {', '.join(prov)}  default: {qc['bits']}-bit "
                  f"g{qc['group_size']} {'sym' if qc.get('sym') else 'asym'} desc_act={qc.get('desc_act')}")
    if not m:
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
        short = sorted({n.split(".", 3)[3] for n in mods})
        table.add_column("layer")
        for s in short:
            table.add_column(s.rsplit(".", 1)[-1])
        layers = sorted({int(n.split(".")[2]) for n in mods})
        for i in layers:
            row = [str(i)]
            for s in short:
                o = mods.get(f"model.layers.{i}.{s}")
                row.append(f"{o['bits']}" if o else "16")
            table.add_row(*row)
    console.print(table)
    t = m["totals"]
    console.print(f"quantized linears: {t['modules']}, kept 16-bit: {t['skipped']}, "
                  f"bytes {t['quantized_linear_bytes']:,} ({t['quantized_linear_bytes'] / 2**20:.2f} MiB), "
                  f"{t['avg_bits']:.3f} bits/weight; compiled by quantc {m.get('quantc')} "
                  f"from {m['source']['model']} in {m['timings'].get('total_s', 0):.0f} s")


if __name__ == "__main__":
    main()
