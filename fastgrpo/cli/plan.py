"""``fastgrpo-plan``: per-GPU memory of a GRPO run for a model and parallel layout, on paper.

    fastgrpo-plan --model llama3-70b --tp 8 --pp 2 --nodes 2 --gpus-per-node 8 --gpu h100
    fastgrpo-plan --model /models/Qwen2.5-7B-Instruct --backend deepspeed --zero-stage 3 --dp 8 --json
    fastgrpo-plan experiment=paper_qwen2.5-7b_1gpu --gpu h800        # the plan of a fastgrpo-train config
    fastgrpo-plan experiment=paper_qwen2.5-7b --dp 8

Prints, per GPU (for the first and the last pipeline stage when PP > 1), the bytes of the policy's
weights, gradients and optimizer state, the KL reference model, the draft model and its optimizer,
the rollout KV caches and buffers, estimated activations, the peak of each phase of a step
(generation, policy update, draft update) against the GPU's memory, and the verification budget
(N_verify, K, L) the concurrency-aware controller picks as rows finish. The accounting is
documented in fastgrpo/plan.py.

Hydra overrides (``key=value``, ``experiment=NAME``, put before any flag) compose fastgrpo-train's
config and plan that run: its model (``model.path``'s config.json, else the ``model`` group's name
as an architecture preset), backend and layout, precision, rollout shape, KL, draft, verification
budget, LoRA and gradient checkpointing. Flags given explicitly override it; the number of GPUs
comes from --dp / --nodes (a config does not say how many processes launch it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from fastgrpo.cli.errors import ArgumentParser, cli_errors
from fastgrpo.plan import (
    ARCH_PRESETS,
    GENERATION,
    GPUS,
    LORA_PROJECTIONS,
    PERSISTENT,
    Layout,
    Options,
    Plan,
    Precision,
    RolloutShape,
    gib,
    load_arch,
    make_plan,
    with_dp_from_world,
)

PHASES = ("persistent", "generation", "policy update", "draft update")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fastgrpo-plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="fastgrpo-train config overrides (e.g. experiment=paper_qwen2.5-7b_1gpu): plan that run; "
                        "explicit flags win")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="llama3-70b",
                   help=f"an architecture preset ({', '.join(ARCH_PRESETS)}) or a folder with an HF config.json")
    lay = p.add_argument_group("parallel layout")
    lay.add_argument("--backend", default="megatron", choices=["megatron", "deepspeed", "torch"],
                     help="megatron: tensor x pipeline x data parallel; deepspeed: ZeRO data parallel; torch: DDP")
    lay.add_argument("--tp", type=int, default=1, help="tensor parallel: matrices split over this many GPUs")
    lay.add_argument("--pp", type=int, default=1, help="pipeline parallel: layers split into this many stages")
    lay.add_argument("--dp", type=int, default=None,
                     help="data parallel replicas (default: nodes*gpus_per_node/(tp*pp), else 1)")
    lay.add_argument("--nodes", type=int, default=None, help="nodes (with --gpus-per-node: DP = world/(TP*PP))")
    lay.add_argument("--gpus-per-node", type=int, default=8)
    lay.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3],
                     help="deepspeed: 1 shards the optimizer over DP, 2 also gradients, 3 also weights")
    lay.add_argument("--no-distributed-optimizer", action="store_true",
                     help="megatron: keep the full optimizer on every DP rank (default: shard master+moments)")
    lay.add_argument("--vocab-divisible-by", type=int, default=128,
                     help="megatron pads the vocab to a multiple of this times TP")
    pr = p.add_argument_group("precision (bytes per parameter)")
    pr.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                    help="bf16: bf16 weights + fp32 master + fp32 Adam m/v (grads fp32 on megatron, bf16 "
                         "otherwise); fp32: everything fp32, no master copy")
    pr.add_argument("--grad-bytes", type=int, default=None, help="override: bytes per gradient element")
    pr.add_argument("--master-bytes", type=int, default=None, help="override: bytes of the master copy")
    pr.add_argument("--optim-bytes", type=int, default=None, help="override: bytes of optimizer moments (Adam: 8)")
    ro = p.add_argument_group("GRPO rollout shape")
    ro.add_argument("--prompts-per-step", type=int, default=32, help="prompts per GRPO step (all DP ranks)")
    ro.add_argument("--group-size", type=int, default=8, help="G samples per prompt; rows per DP rank = "
                                                                "prompts*G/DP")
    ro.add_argument("--prompt-len", type=int, default=1024, help="max prompt tokens")
    ro.add_argument("--response-len", type=int, default=3072, help="max response tokens (rollout.max_new_tokens)")
    ro.add_argument("--micro-batch", type=int, default=1, help="sequences per training forward/backward")
    ro.add_argument("--kl-beta", type=float, default=0.04, help="KL coefficient; 0 builds no reference model")
    ro.add_argument("--reference-offload", action="store_true", help="reference weights on CPU between uses")
    tr = p.add_argument_group("training memory")
    tr.add_argument("--lora-rank", type=int, default=0,
                    help="train a LoRA adapter of this rank (torch/deepspeed), base weights frozen; 0: full fine-tuning")
    tr.add_argument("--lora-targets", nargs="+", default=list(LORA_PROJECTIONS), help="projections the adapter adapts")
    tr.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="each layer keeps only its input and is recomputed in the backward pass")
    dr = p.add_argument_group("draft model")
    dr.add_argument("--draft", default="eagle", choices=["eagle", "lm", "none"],
                    help="eagle: one decoder layer + fc on the target's hidden states; lm: an independent "
                         "small LM; none: plain autoregressive rollouts")
    dr.add_argument("--draft-model", default=None,
                    help="draft=lm: a preset or config folder (default: fastgrpo's half-width 2-layer LM)")
    dr.add_argument("--features-on-cpu", action="store_true",
                    help="count the captured hidden-state features as CPU memory (the code keeps them on GPU)")
    dr.add_argument("--draft-token-budget", type=int, default=4096, help="draft.token_budget (tokens per "
                                                                        "draft micro-batch)")
    bu = p.add_argument_group("verification budget (DESIGN.md 3)")
    bu.add_argument("--c-peak", type=int, default=160, help="tokens per target forward at the hardware's knee "
                                                            "(160: H800, 7B; measure yours with fastgrpo-profile)")
    bu.add_argument("--n-max", type=int, default=160, help="cap on tokens verified per row per step")
    bu.add_argument("--k-max", type=int, default=8, help="cap on the tree width")
    bu.add_argument("--l-min", type=int, default=3, help="min tree depth")
    bu.add_argument("--l-max", type=int, default=5, help="max tree depth")
    bu.add_argument("--alpha", type=float, default=0.75, help="depth = log2(N_verify/alpha), clamped")
    bu.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help="rows still generating to show the budget at (default: rows, rows/2, ..., 1)")
    g = p.add_argument_group("GPU")
    g.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="GPU model (memory as nvidia-smi reports)")
    g.add_argument("--gpu-gib", type=float, default=None, help="override the GPU memory (GiB)")
    g.add_argument("--reserve-gib", type=float, default=5.0,
                   help="kept free for the CUDA context, NCCL buffers and allocator fragmentation")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    out.add_argument("--plain", action="store_true", help="plain text tables (no rich)")
    return p


def plan_from_args(a: argparse.Namespace) -> Plan:
    from fastgrpo.rollout.budget import BudgetParams

    if a.lora_rank < 0:
        raise ValueError(f"--lora-rank {a.lora_rank}: must be >= 0 (0: full fine-tuning)")
    arch = load_arch(a.model)
    layout = Layout(a.backend, a.tp, a.pp, 1, a.zero_stage, not a.no_distributed_optimizer, a.vocab_divisible_by)
    if a.dp is not None:
        layout = Layout(a.backend, a.tp, a.pp, a.dp, a.zero_stage, layout.distributed_optimizer, a.vocab_divisible_by)
        if a.nodes is not None and layout.world != a.nodes * a.gpus_per_node:
            raise ValueError(f"TP*PP*DP = {layout.world} != nodes*gpus_per_node = {a.nodes * a.gpus_per_node}")
    elif a.nodes is not None:
        layout = with_dp_from_world(layout, a.nodes * a.gpus_per_node)
    prec = Precision.named(a.precision, a.backend)
    prec = Precision(prec.param_bytes, prec.grad_bytes if a.grad_bytes is None else a.grad_bytes,
                     prec.master_bytes if a.master_bytes is None else a.master_bytes,
                     prec.optim_bytes if a.optim_bytes is None else a.optim_bytes)
    shape = RolloutShape(a.prompts_per_step, a.group_size, a.prompt_len, a.response_len, a.micro_batch)
    opts = Options(draft=a.draft, draft_arch=load_arch(a.draft_model) if a.draft_model else None,
                   kl_beta=a.kl_beta, reference_offload=a.reference_offload, features_on_cpu=a.features_on_cpu,
                   draft_token_budget=a.draft_token_budget, gpu=a.gpu, gpu_gib=a.gpu_gib, reserve_gib=a.reserve_gib,
                   lora_rank=a.lora_rank, lora_targets=tuple(a.lora_targets),
                   gradient_checkpointing=a.gradient_checkpointing)
    bp = BudgetParams(c_peak=a.c_peak, n_max=a.n_max, k_max=a.k_max, l_min=a.l_min, l_max=a.l_max, alpha=a.alpha)
    return make_plan(arch, layout, prec, shape, opts, bp, a.concurrency)


def memory_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the memory table in GiB; phase rows start with '='."""
    head = ["GiB per GPU"] + [f"{s.stage} stage" if s.stage != "all" else "every GPU" for s in plan.stages]
    rows = [[k] + [f"{gib(s.items[k]):.2f}" for s in plan.stages] for k in plan.stages[0].items]
    for ph in PHASES:
        rows.append([f"= {ph} peak"] + [f"{gib(s.phases[ph]):.2f}" for s in plan.stages])
    return head, rows


def summary_lines(plan: Plan) -> list[str]:
    usable = plan.capacity - plan.reserve
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    return [
        (f"model {plan.model}: {plan.total_params / 1e9:.2f}B parameters ({plan.trainable_params / 1e9:.3f}B "
         f"trainable); {plan.layout}"),
        f"precision: {plan.precision}",
        f"rows per DP rank {plan.rows_per_rank}, KV slots per row {plan.seq_slots} (prompt + response + tree slack)",
        (f"{plan.gpu}: usable {gib(usable):.1f} GiB after a {gib(plan.reserve):.1f} GiB reserve; "
         f"peak {gib(plan.peak):.1f} GiB -> {verdict} (headroom {gib(usable - plan.peak):+.1f} GiB)"),
        f"rollout rows per DP rank that fit beside the persistent state: {plan.max_rows_fit}",
        f"persistent = {' + '.join(PERSISTENT)}",
        f"generation adds {' + '.join(GENERATION)}",
        *[f"note: {n}" for n in plan.notes],
    ]


def budget_table(plan: Plan) -> tuple[list[str], list[list[str]]]:
    head = ["concurrency B", "N_verify", "K", "L", "tokens/forward", "step"]
    rows = [[str(r["concurrency"]), str(r["n_verify"]), str(r["k"]), str(r["depth"]), str(r["tokens_per_forward"]),
             r["mode"]] for r in plan.budget]
    return head, rows


def _plain(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def print_plan(plan: Plan, plain: bool = False, file=None) -> None:
    file = file or sys.stdout
    tables = [("Per-GPU memory", memory_rows(plan)), ("Verification budget per DP rank", budget_table(plan))]
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for title, (head, rows) in tables:
            print(f"{title}\n{_plain(head, rows)}\n", file=file)
        print("\n".join(summary_lines(plan)), file=file)
        return
    console = Console(file=file, width=max(110, Console(file=file).width))
    for title, (head, rows) in tables:
        t = Table(title=title)
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*r, style="bold" if r[0].startswith("=") else None)
        console.print(t)
    for line in summary_lines(plan):
        console.print(line, style=("green" if plan.fits else "red") if "FIT" in line else None, highlight=False,
                      soft_wrap=True)


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The ``dest`` of every option that ``argv`` names (``--tp 8`` or ``--tp=8``)."""
    return {a.dest for a in parser._actions for opt in a.option_strings
            if any(arg == opt or arg.startswith(opt + "=") for arg in argv)}


# Every ValueError of the paper plan is about its input (a layout that does not divide, a folder
# without config.json): reported as one line, exit 2.
@cli_errors("fastgrpo-plan", extra=(ValueError,))
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.overrides:
        from fastgrpo.cli.plan_config import apply_run_config

        apply_run_config(args, explicit_options(parser, argv))
    plan = plan_from_args(args)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan, plain=args.plain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
