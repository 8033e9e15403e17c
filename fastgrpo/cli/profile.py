"""``fastgrpo-profile``: measure (or read from the cache) C_peak, the tokens per target forward at
the hardware's knee, for a model on this device.

    fastgrpo-profile --model tiny
    fastgrpo-profile --model /models/Qwen2.5-7B --dtype bfloat16 --device cuda --max-tokens 4096

Prints the sweep as a table and the chosen C_peak; the JSON cache and a PNG plot are written
under ``--cache-dir`` (the trainer reads the same cache when ``rollout.c_peak`` is unset).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from fastgrpo.cli.errors import ArgumentParser, cli_errors
from fastgrpo.rollout.profile_cache import DEFAULT_CACHE_DIR


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fastgrpo-profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="a preset name (tiny, small) or a local HF model folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                   help="attention implementation (tree verification needs an arbitrary mask)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--layout", default="single", help="parallel layout recorded in the cache key")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest tokens per forward swept")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="explicit token counts to sweep")
    p.add_argument("--prefix-len", type=int, default=64, help="cached prompt tokens per row")
    p.add_argument("--max-rows", type=int, default=8, help="rows before trees grow (see split_tokens)")
    p.add_argument("--max-tree", type=int, default=64, help="tree tokens per row before rows grow")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--statistic", default="median", choices=["median", "min"],
                   help="latency per point over the repeats (min: steadier on a busy shared CPU)")
    p.add_argument("--frac", type=float, default=0.95, help="the knee: this fraction of peak throughput")
    p.add_argument("--latency-tol", type=float, default=2.0,
                   help="cap the knee where forward latency exceeds this multiple of the 1-token latency "
                        "(binds on CPUs; 0 disables)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--force", action="store_true", help="re-measure even when cached")
    p.add_argument("--out-png", default=None, help="plot path (default: next to the JSON cache)")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def print_profile(prof, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    # Not a terminal (a log file, CI): rich would wrap at 80 columns.
    console = console or (Console() if sys.stdout.isatty() else Console(width=120))
    peak = max((p["throughput_tok_s"] for p in prof.points), default=0.0) or 1.0
    table = Table(title=f"C_peak sweep: {prof.info.get('model')} {prof.key['dtype']} on {prof.key['device']}")
    for col in ("tokens", "rows x tree", "latency ms", "min-max ms", "tokens/s", "% of max"):
        table.add_column(col, justify="right")
    for p in prof.points:
        mark = p["tokens"] == prof.c_peak
        table.add_row(
            f"{p['tokens']}{' *' if mark else ''}",
            f"{p['rows']} x {p['tree_tokens']}",
            f"{p['latency_ms']:.2f}",
            f"{p['latency_ms_min']:.2f}-{p['latency_ms_max']:.2f}",
            f"{p['throughput_tok_s']:,.0f}",
            f"{100 * p['throughput_tok_s'] / peak:.0f}%",
            style="bold" if mark else None,
        )
    console.print(table)
    src = "cached" if prof.cached else "measured"
    console.print(f"C_peak = [bold]{prof.c_peak}[/bold] tokens per forward ({src}; * in the table)")
    if not prof.saturated:
        console.print("[yellow]the sweep did not reach a plateau: the knee may be larger (--max-tokens)[/yellow]")
    console.print(f"cache: {prof.path}")
    if prof.png:
        console.print(f"plot:  {prof.png}")
    console.print(f"pin it with rollout.c_peak={prof.c_peak}")


@cli_errors("fastgrpo-profile")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastgrpo.config import ModelConfig
    from fastgrpo.models import load_policy
    from fastgrpo.rollout.profile import load_or_profile

    device = _device(args.device)
    model, _ = load_policy(ModelConfig(path=args.model, dtype=args.dtype, attn_implementation=args.attn), device)
    prof = load_or_profile(
        model, args.cache_dir, model_name=args.model, layout=args.layout, force=args.force,
        tokens_per_forward=args.tokens, max_tokens=args.max_tokens, prefix_len=args.prefix_len,
        max_rows=args.max_rows, max_tree=args.max_tree, warmup=args.warmup, repeats=args.repeats,
        statistic=args.statistic,
        frac=args.frac, latency_tol=args.latency_tol or None, out_png=args.out_png,
    )
    print_profile(prof)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
