"""``fastgrpo-pretrain-draft``: pretrain an EAGLE draft offline on the target's own generations.

    fastgrpo-pretrain-draft --model /models/Qwen2.5-7B-Instruct --data /data/gsm8k/train.parquet \\
        --data-kind gsm8k --steps 500 --out drafts/qwen7b-eagle.pt

Then ``fastgrpo-train rollout=fastgrpo draft.init_path=drafts/qwen7b-eagle.pt``.
"""

from __future__ import annotations

from fastgrpo.cli.errors import ArgumentParser, cli_errors


@cli_errors("fastgrpo-pretrain-draft")
def main(argv=None) -> int:
    p = ArgumentParser(prog="fastgrpo-pretrain-draft", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="preset name or local HF folder (the target)")
    p.add_argument("--data", default=None, help="prompt file (.jsonl/.parquet); default: the synthetic task")
    p.add_argument("--data-kind", default="gsm8k", choices=["gsm8k", "prompt_answer"])
    p.add_argument("--prompt-field", default="question")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="where to write the draft state (.pt)")
    a = p.parse_args(argv)

    import torch

    from fastgrpo.config import DataConfig, ModelConfig
    from fastgrpo.data import build_datasets
    from fastgrpo.draft import EagleDraft
    from fastgrpo.draft.pretrain import pretrain_on_generations, save_draft
    from fastgrpo.models import load_policy

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    model, tok = load_policy(ModelConfig(path=a.model), device)
    data = DataConfig() if a.data is None else DataConfig(kind=a.data_kind, train_path=a.data,
                                                          prompt_field=a.prompt_field, answer_field=a.answer_field)
    train, _ = build_datasets(data, tok)
    draft = EagleDraft(model.eval())
    pretrain_on_generations(model, draft, [it.prompt_ids for it in train], (tok.eos_token_id,), a.steps, a.lr,
                            a.batch, a.max_new_tokens)
    save_draft(draft, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
