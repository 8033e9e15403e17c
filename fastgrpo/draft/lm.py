"""An independent small causal LM as the draft (``draft.kind=lm``): the classic speculative setup
(e.g. Qwen2.5-0.5B drafting for Qwen2.5-7B), the baseline of the paper's draft-architecture
ablation against the EAGLE head (fastgrpo.draft.eagle).

- :class:`LMProposer` keeps its own ragged KV cache (an :class:`HFTargetRunner` over the draft
  model) in step with the target: it caches every token of each row (prompt, then every emitted
  token, the current root included after the catch-up). Tokens emitted since the last proposal
  wait in a per-row pending buffer and are fed in one catch-up forward; the logits at each row's
  last pending token (the root) give the depth-1 candidates; deeper levels expand the K best
  beams exactly like :class:`fastgrpo.draft.proposer.EagleProposer` (EAGLE-2). It reads no target
  hidden state: ``observe``'s ``hidden`` is ignored.
- :class:`LMDraftLearner` distils the target into the draft online, on the rollouts the policy
  just produced: teacher-forced over prompt + response, loss = soft cross-entropy of the draft's
  next-token distribution against the target's, ``softmax(target_lm_head(features[t]))``
  (``Rollouts.features`` are the target's final hidden states: no extra target pass), response
  positions only, one AdamW step per call.
- :func:`build_lm_draft` obtains the draft model (a local HF folder, or a scaled-down Qwen2 built
  from the target's config; see its docstring).

Vocabularies: the draft must share the target's tokenizer. The embedding tables may be padded
to different sizes (Qwen2.5-0.5B: 151936 rows, Qwen2.5-7B: 152064, one tokenizer of 151665
tokens): both must cover the tokenizer. The proposer never proposes an id the target lacks and
the learner distils over the ids both have.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import ClassVar

import torch

from fastgrpo.draft.beam import expand_tree
from fastgrpo.draft.learner import DraftSequence, OnlineDraftLearner, check_draft_state, read_draft_state
from fastgrpo.rollout.budget import Budget
from fastgrpo.rollout.hf_runner import HFTargetRunner, check_runner_support
from fastgrpo.rollout.kv_cache import compact_rows
from fastgrpo.rollout.tree import TreeBatch

# ---------------------------------------------------------------------------------------------
# Proposer
# ---------------------------------------------------------------------------------------------


class LMProposer:
    """Same interface as EagleProposer: ``start``, ``observe``, ``propose``, ``drop_rows``,
    ``release``. ``vocab_size``: the target's vocabulary size (draft ids at or beyond it are
    never proposed); None = the draft's own."""

    def __init__(self, draft_model: torch.nn.Module, max_batch: int, max_len: int, tree_slots: int,
                 vocab_size: int | None = None):
        impl = getattr(draft_model.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"the draft LM uses attn_implementation={impl!r}; token trees need an arbitrary "
                             f"4-D mask: load it with attn_implementation='sdpa' (or 'eager')")
        self.runner = HFTargetRunner(draft_model, max_batch, max_len + tree_slots)
        dev = self.runner.device
        self.pend_tok = torch.zeros(max_batch, max_len, dtype=torch.long, device=dev)
        self.pend_len = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.rows = 0
        self.vocab_size = vocab_size
        self.last_catch_up: tuple[int, float] | None = None  # (tokens fed, seconds) by the last propose

    # ---- keeping in step with the target ---------------------------------------------------
    def start(self, prompts: list[list[int]], hidden: torch.Tensor, first_tokens: torch.Tensor) -> None:
        """Pending tokens per row: the prompt followed by the first sampled token (the first root).
        ``hidden`` (the target's) is ignored: this draft reads tokens only."""
        b = len(prompts)
        dev = self.runner.device
        self.rows = self.runner.cache.num_rows = b
        self.runner.cache.lengths.zero_()
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        width = int(lens.max()) + 1
        if width > self.pend_tok.shape[1]:
            raise ValueError(f"prompt of {width - 1} tokens does not fit the draft's max_len={self.pend_tok.shape[1]}")
        toks = torch.zeros(b, width, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            toks[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        toks[torch.arange(b, device=dev), lens] = first_tokens.to(dev)
        self.pend_tok[:b, :width] = toks
        self.pend_len[:b] = lens + 1

    def observe(self, hidden: torch.Tensor | None, tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """Queue the tokens each row emitted this step (accepted draft tokens and the bonus)."""
        dev = self.pend_tok.device
        tokens, counts = tokens.to(dev), counts.to(dev)
        b, n = tokens.shape
        j = torch.arange(n, device=dev).unsqueeze(0)
        valid = j < counts.unsqueeze(1)
        pos = (self.pend_len[:b].unsqueeze(1) + j).clamp(max=self.pend_tok.shape[1] - 1)
        rows = torch.arange(b, device=dev).unsqueeze(1).expand(b, n)
        self.pend_tok[rows[valid], pos[valid]] = tokens[valid]
        self.pend_len[:b] += counts

    def drop_rows(self, rows: torch.Tensor) -> None:
        self.rows = compact_rows(self.rows, rows, self.pend_tok, self.pend_len)
        self.runner.drop_rows(rows.to(self.pend_len.device))

    def release(self) -> None:
        self.runner.release()
        self.pend_tok = self.pend_len = None

    def backlog(self) -> int:
        """The tokens the next proposal feeds the draft before drafting, padded to the longest row."""
        return self.rows * int(self.pend_len[: self.rows].max()) if self.rows else 0

    # ---- proposing -------------------------------------------------------------------------
    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.vocab_size is not None and logits.shape[-1] > self.vocab_size:
            logits[..., self.vocab_size:] = float("-inf")
        return logits.log_softmax(-1)

    @torch.no_grad()
    def _catch_up(self) -> torch.Tensor:
        """Feed and cache every row's pending tokens (ragged: padded, a causal chain, only the
        valid count committed); returns the draft's log-probs after each row's last one."""
        t0 = time.perf_counter()
        b = self.rows
        counts = self.pend_len[:b].clone()
        n = int(counts.max())
        dev = counts.device
        causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril().expand(b, n, n)
        offsets = torch.arange(n, device=dev).expand(b, n)
        _, hidden = self.runner.forward_block(self.pend_tok[:b, :n], offsets, offsets, causal, with_logits=False)
        self.runner.commit(offsets, counts)  # padded slots lie past the new length: dropped
        self.pend_len[:b] = 0
        last = hidden[torch.arange(b, device=dev), (counts - 1).clamp(min=0)]
        self.last_catch_up = (b * n, time.perf_counter() - t0)
        return self._logprobs(self.runner.lm_head(last))

    @torch.no_grad()
    def propose(self, roots: torch.Tensor, budget: Budget) -> TreeBatch:
        """EAGLE-2 over the draft LM (fastgrpo.draft.beam.expand_tree): a beam reads its own
        token only, written uncommitted (the next catch-up overwrites it)."""
        logp = self._catch_up()

        def expand(d, beam_tok, _state, slot, vis):
            b, k = beam_tok.shape
            # The root sits at position len-1, so a depth-d token at len + d - 1.
            pos = torch.full((b, k), d - 1, dtype=torch.long, device=beam_tok.device)
            logits, _ = self.runner.forward_block(beam_tok, pos, slot.expand(b, k), vis)
            return self._logprobs(logits), None

        return expand_tree(roots, logp, budget, expand)


# ---------------------------------------------------------------------------------------------
# Online distillation
# ---------------------------------------------------------------------------------------------


def collate_lm(seqs: list[DraftSequence], device, dtype):
    """-> inputs[B,T] (x_0..x_{n-2}), target hidden[B,T,H] (h_0..h_{n-2}), loss mask[B,T]: position
    t predicts x_{t+1}; it carries loss when x_{t+1} is a response token."""
    t = max(len(s.tokens) - 1 for s in seqs)
    h = seqs[0].hidden.shape[-1]
    inputs = torch.zeros(len(seqs), t, dtype=torch.long, device=device)
    hidden = torch.zeros(len(seqs), t, h, dtype=dtype, device=device)
    mask = torch.zeros(len(seqs), t, dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        n = len(s.tokens) - 1
        inputs[i, :n] = s.tokens[:n].to(device)
        hidden[i, :n] = s.hidden[:n].to(device=device, dtype=dtype)
        mask[i, max(s.response_start - 1, 0): n] = True
    return inputs, hidden, mask


def lm_distill_loss(draft_model: torch.nn.Module, target_lm_head: torch.nn.Module, inputs: torch.Tensor,
                    target_hidden: torch.Tensor, loss_mask: torch.Tensor, num_tokens: float | None = None):
    """Soft cross-entropy of the draft's next-token distribution against the target's
    (softmax(target_lm_head(h_t))) at the masked positions. Returns (loss, sums for metrics).
    Logits are computed at the masked positions only (the vocabulary is large)."""
    h = draft_model.get_decoder()(input_ids=inputs, use_cache=False).last_hidden_state
    sel = loss_mask.nonzero(as_tuple=True)
    logits = draft_model.get_output_embeddings()(h[sel]).float()  # [N, V_draft]
    with torch.no_grad():
        w = target_lm_head.weight
        t_logp = target_lm_head(target_hidden[sel].to(device=w.device, dtype=w.dtype)).float()
        t_logp = t_logp.to(logits.device).log_softmax(-1)  # [N, V_target]
    common = min(logits.shape[-1], t_logp.shape[-1])
    d_logp = logits.log_softmax(-1)[:, :common]
    p = t_logp[:, :common].exp()
    ce = -(p * d_logp).sum(-1)
    denom = num_tokens if num_tokens is not None else max(ce.numel(), 1)
    loss = ce.sum() / denom
    with torch.no_grad():
        kl = (p * (t_logp[:, :common] - d_logp)).sum(-1)
        agree = (d_logp.argmax(-1) == t_logp.argmax(-1)).float()
        sums = {"ce": float(ce.sum()), "kl": float(kl.sum()), "top1": float(agree.sum()), "tokens": float(ce.numel())}
    return loss, sums


class LMDraftLearner(OnlineDraftLearner):
    """Online distillation of the target into the draft LM, on every rollout (zero-reward ones
    too), one AdamW step per ``update`` (gradient accumulation over micro-batches of at most
    ``token_budget`` padded tokens). Same input (``list[DraftSequence]``) and metric names as
    :class:`fastgrpo.draft.learner.EagleDraftLearner` (``draft/smooth_l1`` aside: this draft predicts
    no hidden state; ``draft/kl`` is added)."""

    metric_names: ClassVar[dict[str, str]] = {"ce": "draft/ce", "kl": "draft/kl"}

    def __init__(self, draft_model: torch.nn.Module, target_lm_head: torch.nn.Module, lr: float = 1e-4,
                 token_budget: int = 4096, weight_decay: float = 0.0, grad_clip: float = 1.0, group=None):
        super().__init__(draft_model, lr, weight_decay, token_budget, grad_clip, group)
        # A tuple keeps the target's head out of any module registration / state dict.
        self._frozen = (target_lm_head,)

    @property
    def target_lm_head(self) -> torch.nn.Module:
        return self._frozen[0]

    def _collate_batch(self, seqs, device, dtype):
        return collate_lm(seqs, device, dtype)

    def _loss_tokens(self, batch) -> int:
        return int(batch[2].sum())

    def _loss(self, batch, num_tokens):
        inputs, hidden, mask = batch
        return lm_distill_loss(self.draft, self.target_lm_head, inputs, hidden, mask, num_tokens=num_tokens)


# ---------------------------------------------------------------------------------------------
# Obtaining the draft model
# ---------------------------------------------------------------------------------------------


def check_lm_vocab(draft_vocab: int, target_vocab: int, tokenizer=None, where: str = "the draft LM") -> None:
    """The draft must speak the target's tokenizer. With a tokenizer, both embedding tables must
    cover it (padded sizes may differ); without one, the sizes must be equal."""
    if tokenizer is not None:
        need = len(tokenizer)
        if min(draft_vocab, target_vocab) < need:
            raise ValueError(f"{where} has a vocabulary of {draft_vocab} ids and the target {target_vocab}: both must "
                             f"cover the target's tokenizer ({need} tokens); a draft LM must share the target's "
                             f"tokenizer")
    elif draft_vocab != target_vocab:
        raise ValueError(f"{where} has a vocabulary of {draft_vocab} ids but the target has {target_vocab}: a draft LM "
                         f"must share the target's tokenizer")


def _check_draft_tokenizer(path: Path, tokenizer) -> None:
    """When the draft folder ships a tokenizer, it must map tokens to the same ids as the target's."""
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        return
    if own.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the draft LM in {path} has a different tokenizer ({len(own)} tokens) from the target's "
                         f"({len(tokenizer)} tokens): a draft LM must share the target's tokenizer")


def small_lm_config(target_config, hidden_scale: float = 0.5, num_layers: int = 2):
    """A Qwen2 config scaled down from the target's: ``hidden_scale`` of the hidden and MLP sizes
    (whole heads of the target's head size), ``num_layers`` layers, the same vocabulary, RoPE and
    norm epsilon, tied embeddings, sdpa attention (trees need 4-D masks)."""
    from transformers import Qwen2Config

    tc = target_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    heads = max(1, int(tc.hidden_size * hidden_scale) // head_dim)
    kv = max(1, tc.num_key_value_heads * heads // tc.num_attention_heads)
    while heads % kv:
        kv -= 1
    kwargs = {}
    rope = getattr(tc, "rope_parameters", None)
    if rope:
        kwargs["rope_parameters"] = copy.deepcopy(dict(rope))
    elif getattr(tc, "rope_theta", None):
        kwargs["rope_theta"] = tc.rope_theta
    return Qwen2Config(vocab_size=tc.vocab_size, hidden_size=heads * head_dim,
                       intermediate_size=max(1, int(tc.intermediate_size * hidden_scale)),
                       num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv,
                       max_position_embeddings=tc.max_position_embeddings, rms_norm_eps=tc.rms_norm_eps,
                       tie_word_embeddings=True, attn_implementation="sdpa",
                       bos_token_id=getattr(tc, "bos_token_id", None), eos_token_id=getattr(tc, "eos_token_id", None),
                       pad_token_id=getattr(tc, "pad_token_id", None), **kwargs)


@torch.no_grad()
def _init_embedding_from_target(draft: torch.nn.Module, target_embedding: torch.nn.Module, chunk: int = 16384) -> None:
    """Same hidden size: copy the target's input embedding. Smaller: its projection on the top
    principal directions (eigenvectors of E^T E), which keeps the token-similarity structure."""
    src = target_embedding.weight
    dst = draft.get_input_embeddings().weight
    v = min(src.shape[0], dst.shape[0])
    if src.shape[1] == dst.shape[1]:
        dst[:v].copy_(src[:v])
        return
    if dst.shape[1] > src.shape[1]:
        return  # a wider draft than target: keep the random init
    gram = torch.zeros(src.shape[1], src.shape[1], dtype=torch.float32, device=src.device)
    for part in src[:v].split(chunk):
        part = part.float()
        gram += part.T @ part
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    proj = vecs[:, -dst.shape[1]:].flip(1)  # [H_target, H_draft]
    for i, part in enumerate(src[:v].split(chunk)):
        dst[i * chunk: i * chunk + part.shape[0]].copy_((part.float() @ proj).to(device=dst.device, dtype=dst.dtype))


def build_lm_draft(cfg, target: torch.nn.Module, tokenizer=None, hidden_scale: float = 0.5,
                   num_layers: int = 2, heads=None) -> torch.nn.Module:
    """The draft LM for ``draft.kind=lm`` (cfg: a DraftConfig), on the target's device and dtype.

    - ``cfg.init_path`` a folder: a local HF causal LM (e.g. Qwen2.5-0.5B for a Qwen2.5-7B target)
      loaded with AutoModelForCausalLM and sdpa attention. Its vocabulary must match the
      target's tokenizer (refused otherwise, naming both sizes; a tokenizer shipped in the
      folder must map tokens to the same ids).
    - ``cfg.init_path`` a file (.pt/.safetensors): a draft state saved by fastgrpo (a
      ``LMDraftLearner.state_dict()`` or a plain state dict) for the default model below.
    - None: a small Qwen2 built from the target's config (:func:`small_lm_config`: half the
      hidden and MLP sizes, 2 layers, same vocabulary, tied embeddings) with its embedding
      initialised from the target's (copied when the hidden sizes are equal, else projected on
      the target embedding's top principal directions), the rest random. Chosen so a draft
      exists for any target without a download; a pretrained small model of the same family is
      the better start when one exists.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2ForCausalLM

    p = next(target.parameters())
    embed, head = heads or (target.get_input_embeddings(), target.get_output_embeddings())
    target_vocab = head.weight.shape[0]
    path = Path(cfg.init_path) if cfg.init_path else None
    if path is not None and path.is_dir():
        dcfg = AutoConfig.from_pretrained(str(path))
        check_runner_support(dcfg)  # the proposer drives it with HFTargetRunner: refuse it now
        check_lm_vocab(dcfg.vocab_size, target_vocab, tokenizer, where=f"the draft LM in {path}")
        _check_draft_tokenizer(path, tokenizer)
        draft = AutoModelForCausalLM.from_pretrained(str(path), dtype=p.dtype, attn_implementation="sdpa")
        check_lm_vocab(draft.get_output_embeddings().weight.shape[0], target_vocab, tokenizer,
                       where=f"the draft LM in {path}")
        return draft.to(p.device).eval()
    draft = Qwen2ForCausalLM(small_lm_config(target.config, hidden_scale, num_layers)).to(device=p.device, dtype=p.dtype)
    if path is None:
        _init_embedding_from_target(draft, embed)
    else:
        state = read_draft_state(path)
        check_draft_state(draft.state_dict(), state, ignore=frozenset({"lm_head.weight"}),  # tied to the embedding
                          where=f"draft LM state in {path} does not match the default draft LM for this target "
                                f"(vocab {target_vocab})")
        draft.load_state_dict(state, strict=False)
    return draft.eval()
