"""A tiny word-level tokenizer for the synthetic task, saved as an ordinary HF tokenizer.

Design (all built from stock ``tokenizers`` components, so ``tokenizer.json`` reloads with
``AutoTokenizer.from_pretrained`` and behaves identically):

* Pre-tokenizer: split on whitespace, then isolate ``####``, digit runs and every other
  punctuation character (``"apples."`` -> ``apples`` ``.``).
* Model: WordPiece over a vocabulary that holds whole words, the digits ``0-9`` and
  *continuation* digits ``@@0``-``@@9`` (and no multi-digit tokens). A number is therefore spelled
  one token per digit: ``"106"`` -> ``1 @@0 @@6``. A word-level lookup with per-digit splitting
  would decode ``106`` as ``"1 0 6"``; the continuation prefix is what lets the decoder glue the
  digits of one number back together. Unknown words become ``<unk>``.
* Decoder: WordPiece with prefix ``@@`` and no cleanup: tokens are joined with single spaces,
  continuation digits without one. ``"3 + 5 = 8 . #### 106"`` survives an encode/decode round trip
  exactly (the synthetic text is space-separated tokens; other text comes back space-normalised,
  e.g. ``"apples."`` -> ``"apples ."``). The prefix is ``@@`` rather than WordPiece's usual ``##``
  so the answer marker ``####`` is not mistaken for a continuation.
* Special tokens: ``<|pad|>`` (pad), ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (eos: a
  response ends with it), and ``<unk>``.
* A short Qwen-style chat template.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|endoftext|>"  # used as the model's bos id (Qwen convention); never auto-added
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOS_TOKEN = IM_END
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, IM_START, IM_END)
CONTINUATION_PREFIX = "@@"
ANSWER_MARKER = "####"
PUNCTUATION = ("+", "-", "*", "/", "=", ".", ",", "?", "!", ":", ";", "(", ")", "$", "%", "'", '"', "#")
CHAT_ROLES = ("system", "user", "assistant")

# Qwen-like: <|im_start|>role\ncontent<|im_end|>\n ... <|im_start|>assistant\n
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PRE_TOKEN_PATTERN = r"####|\d+|[^\w\s]"


def _vocab(words: Iterable[str]) -> dict[str, int]:
    tokens: list[str] = list(SPECIAL_TOKENS) + [UNK_TOKEN]
    tokens += [str(d) for d in range(10)]
    tokens += [CONTINUATION_PREFIX + str(d) for d in range(10)]
    tokens += [ANSWER_MARKER, *PUNCTUATION]
    tokens += list(CHAT_ROLES)
    for w in words:
        if not isinstance(w, str) or not w:
            raise ValueError(f"vocabulary words must be non-empty strings, got {w!r}")
        if any(ch.isspace() for ch in w) or any(ch.isdigit() for ch in w):
            raise ValueError(f"vocabulary word {w!r} contains whitespace or a digit")
        if any(not (ch.isalnum() or ch == "_") for ch in w) and w not in tokens:
            raise ValueError(f"vocabulary word {w!r} contains punctuation (the pre-tokenizer splits it)")
        tokens.append(w)
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """The word tokenizer over ``words`` (plus digits, punctuation, chat roles, special tokens)."""
    vocab = _vocab(words)
    tok = Tokenizer(
        models.WordPiece(
            vocab,
            unk_token=UNK_TOKEN,
            continuing_subword_prefix=CONTINUATION_PREFIX,
            max_input_chars_per_word=100,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(_PRE_TOKEN_PATTERN), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX, cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[BOS_TOKEN, IM_START],
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )
