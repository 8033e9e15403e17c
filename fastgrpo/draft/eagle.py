"""EAGLE-style draft head: reads the target's last hidden state and the next token's embedding,
predicts the next hidden state, and scores tokens through the target's frozen LM head.

Built from the target's own config and decoder-layer class, so a draft exists for any HF target
(Qwen2/2.5/3, Llama 3). The embedding and LM head are the target's (shared, frozen, never
copied): only ``fc``, the decoder layer and the norm are trained (fastgrpo/draft learner).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fastgrpo.rollout.kv_cache import RaggedKVCache, additive_mask


class EagleDraft(nn.Module):
    def __init__(self, target: nn.Module, heads: tuple[nn.Module, nn.Module] | None = None):
        """``heads``: (input embedding, LM head) to use instead of the target's own modules, e.g.
        whole replicas when the target's parameters are sharded (PolicyBackend.draft_heads)."""
        super().__init__()
        cfg = copy.deepcopy(target.config)
        cfg.num_hidden_layers = 1
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = ["full_attention"]
        # Trees need an arbitrary mask: sdpa (or eager), never flash-attn.
        if cfg._attn_implementation not in ("sdpa", "eager"):
            cfg._attn_implementation = "sdpa"
        self.config = cfg
        decoder = target.get_decoder()
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layer = type(decoder.layers[0])(cfg, layer_idx=0)
        self.norm = type(decoder.norm)(h, eps=cfg.rms_norm_eps)
        self.rotary = type(decoder.rotary_emb)(config=cfg)
        # Frozen references to the target's modules, kept out of this module's parameters and
        # state dict (a tuple hides them from nn.Module registration).
        self._frozen = tuple(heads) if heads else (decoder.embed_tokens, target.get_output_embeddings())
        p = next(target.parameters())
        self.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():  # start as "pass the target hidden state through"
            self.fc.weight.zero_()
            self.fc.weight[:, h:].copy_(torch.eye(h))

    @property
    def embed_tokens(self) -> nn.Module:
        return self._frozen[0]

    @property
    def lm_head(self) -> nn.Module:
        return self._frozen[1]

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None = None, cache: RaggedKVCache | None = None, with_logits: bool = True):
        """hidden[B,T,H] (target state at position t), tokens[B,T] (token t+1), positions[B,T]
        -> (predicted hidden at t+1 [B,T,H], logits [B,T,V] or None without ``with_logits``).
        ``mask`` is a boolean [B,T,S] (None: causal over T, for training on whole sequences)."""
        with torch.no_grad():
            emb = self.embed_tokens(tokens)
        x = self.fc(torch.cat([emb.to(hidden.dtype), hidden], dim=-1))
        if mask is None:
            t = tokens.shape[1]
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril().expand(x.shape[0], t, t)
        x = self.layer(x, attention_mask=additive_mask(mask, x.dtype), position_ids=positions,
                       cache=cache, use_cache=cache is not None,
                       position_embeddings=self.rotary(x, positions))
        h = self.norm(x)
        return h, (self.logits(h) if with_logits else None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The policy's head on predicted hidden states. Its weight must get no gradient from the
        draft loss (it would leak into the next policy update); gradients still flow to h."""
        head = self.lm_head
        bias = None if getattr(head, "bias", None) is None else head.bias.detach()
        return F.linear(h, head.weight.detach(), bias)

    def check_compatible(self, target: nn.Module) -> None:
        tc = target.config
        if tc.hidden_size != self.config.hidden_size or tc.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"draft (hidden {self.config.hidden_size}, vocab {self.config.vocab_size}) does not match "
                f"the target (hidden {tc.hidden_size}, vocab {tc.vocab_size})")
