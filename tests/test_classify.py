"""Classification heads: shapes, the summed loss over examples, and the config that asks for them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conveyor.config import ConfigError, ModelConfig
from conveyor.models import SequentialModel
from conveyor.models.classify import PooledClassifier, TokenClassifier


def _cfg(family: str, **kw: object) -> ModelConfig:
    return ModelConfig(family=family, vocab_size=64, n_layers=2, d_model=32, n_heads=2,
                       max_seq_len=8, num_labels=3, **kw)  # type: ignore[arg-type]


def test_encoder_head_classifies_the_first_token() -> None:
    model = SequentialModel(_cfg("bert"), seed=0)
    head = model.blocks[-1]
    assert isinstance(head, PooledClassifier)
    assert {n.split(".")[0] for n, _ in head.named_parameters()} == {"norm", "pooler", "classifier"}
    tokens = torch.randint(0, 60, (4, 8))
    inputs = {"tokens": tokens, "segments": torch.zeros_like(tokens),
              "attention_mask": torch.ones_like(tokens)}
    logits = model(inputs)
    assert logits.shape == (4, 3)
    labels = torch.tensor([0, 2, -100, 1])  # an unlabelled row does not count
    loss = model.loss(inputs, {"label": labels})
    want = F.cross_entropy(logits[[0, 1, 3]], labels[[0, 1, 3]])
    torch.testing.assert_close(loss, want)


def test_decoder_head_reads_each_rows_last_real_token() -> None:
    model = SequentialModel(_cfg("gpt"), seed=0)
    assert isinstance(model.blocks[-1], TokenClassifier)
    tokens = torch.randint(0, 60, (2, 8))
    logits = model(tokens)
    assert logits.shape == (2, 8, 3)
    # causal: what follows a row's last real token changes nothing at that token
    padded = tokens.clone()
    padded[0, 4:] = 7
    torch.testing.assert_close(model(padded)[0, 3], logits[0, 3])
    targets = torch.full((2, 8), -100)
    targets[0, 3], targets[1, 7] = 2, 0
    want = F.cross_entropy(torch.stack([logits[0, 3], logits[1, 7]]), torch.tensor([2, 0]))
    torch.testing.assert_close(model.loss(tokens, targets), want)


@pytest.mark.parametrize(("kw", "message"), [
    ({"num_labels": 1}, "num_labels=1 must be 0"),
    ({"num_labels": 2, "family": "t5"}, "no classification head"),
    ({"num_labels": 2, "tie_embeddings": True}, "nothing to tie"),
])
def test_bad_head_configs(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{"vocab_size": 64, **kw})
