"""The special tokens of the bert and t5 objectives, as Hugging Face tokenizers name them.

Both ways: import reads the ids of an HF tokenizer's [PAD]/[CLS]/[SEP]/[MASK] (BERT) or
pad, eos and ``<extra_id_k>`` sentinels (T5) into ``ModelConfig.special_ids``, so training
masks and corrupts with the model's own ids; export of a Conveyor-trained model adds
those tokens to its tokenizer at the ids the objective used (``data.objectives``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from ..config import ModelConfig
from ..data.objectives import SENTINELS, bert_specials, t5_specials
from ..data.tokenizer import TOKENIZER_CONFIG, special_token
from .export import TOKENIZER_FILE

__all__ = ["FAMILY_TOKENS", "special_ids_of", "with_family_tokens"]

FAMILY_TOKENS = {"bert": {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
                 "t5": {"pad": "<pad>", "eos": "</s>"}}
"""A family's special ids (``data.objectives``) -> the tokens Hugging Face names them by."""


def with_family_tokens(data: bytes, cfg: ModelConfig) -> tuple[bytes, dict[str, Any]]:
    """A Conveyor-trained tokenizer with the family's special ids added as HF names them
    ([CLS] a [SEP] around BERT's input), and the tokenizer_config entries naming them."""
    names = FAMILY_TOKENS.get(cfg.family)
    raw = json.loads(data)
    vocab = (raw.get("model") or {}).get("vocab")
    if names is None or cfg.special_ids or not isinstance(vocab, dict):
        return data, {}  # an imported model's ids are its tokenizer's already
    if cfg.family == "bert":
        sp: Any = bert_specials(cfg)
        ids = {name: getattr(sp, name) for name in names}
        extra = {}
    else:
        sp = t5_specials(cfg)
        ids = {"pad": sp.pad, "eos": sp.eos}
        extra = {f"<extra_id_{k}>": sp.sentinel(k) for k in range(sp.sentinels)}
    tokens = {names[n]: i for n, i in ids.items()} | extra
    if any(i in vocab.values() for i in tokens.values()) or any(t in vocab for t in tokens):
        return data, {}  # the tokenizer fills the vocabulary: nowhere to put them
    raw["model"]["vocab"] = {**vocab, **tokens}  # at the ids the model was trained with
    hf = HFTokenizer.from_str(json.dumps(raw))
    hf.add_special_tokens(list(tokens))
    if cfg.family == "bert":
        template = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["cls"]), ("[SEP]", ids["sep"])])
        old = hf.post_processor
        hf.post_processor = template if old is None else processors.Sequence([old, template])
    named: dict[str, Any] = {f"{n}_token": names[n] for n in ids}
    if extra:
        named["additional_special_tokens"] = list(extra)
    return hf.to_str().encode(), named


def special_ids_of(cfg: ModelConfig, hf_dir: Path) -> dict[str, int] | None:
    """The objective's special ids as the directory's tokenizer numbers them (BERT's [CLS]...,
    T5's pad, eos, <extra_id_k>); none (Conveyor's own, after the tokenizer's) if it lacks one."""
    names = FAMILY_TOKENS.get(cfg.family)
    path = hf_dir / TOKENIZER_FILE
    if names is None or not path.is_file():
        return None
    try:
        settings = json.loads((hf_dir / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        settings = {}  # none, or unreadable: the default names (import reports a bad file)
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception:  # tokenizers raises a bare Exception; the tokenizer's readers report it
        return None
    if not isinstance(settings, dict):
        settings = {}
    tokens = {name: special_token(settings, name) or default for name, default in names.items()}
    ids = {name: tok.token_to_id(token) for name, token in tokens.items()}
    if cfg.family == "t5":  # HF's sentinels (<extra_id_0> the highest id), as many as we use
        for k in range(SENTINELS):
            ids[f"sentinel_{k}"] = tok.token_to_id(f"<extra_id_{k}>")
            if ids[f"sentinel_{k}"] is None:
                break
        if ids["sentinel_0"] is None:  # none named: HF's place, the model's unused top rows
            free = min(cfg.vocab_size - tok.get_vocab_size(), SENTINELS)
            ids.update((f"sentinel_{k}", cfg.vocab_size - 1 - k) for k in range(free))
    found = {n: i for n, i in ids.items() if i is not None and i < cfg.vocab_size}
    complete = set(names) <= set(found) and (cfg.family != "t5" or "sentinel_0" in found)
    return found if complete else None
