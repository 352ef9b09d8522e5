"""Invariants 1 and 2: any schedule and layout trains exactly like one process (fp32),
with gloo's own semantics and under NCCL's (``NcclSemantics``).

Loss of every step within 1e-5 relative, parameters after 3 optimizer steps within
1e-4 relative: GPipe and 1F1B x pp in {1, 2, 4} x microbatches in {1, 2, 4, 8};
interleaved 1F1B (v = 2, 3), ZB-H1, ZB-H2, ZB-V, DualPipeV, V-Half and V-Min at pp
in {2, 4}; a hand-written schedule mixing B with I/W and an overlapped pair; recomputation
on/off, tied embeddings on/off, GPT-2 and Llama flavours; and pp=2 x dp=2 (grads
averaged in buckets of the default size, of 0.01 MiB, and per parameter; and ZeRO-1).
Under NCCL semantics: every schedule x pp in {2, 3, 4} x microbatches in
{1, 2, 3, 4, 8} (DualPipeV from m = 2p), plus pp=2 x dp=2, each also checking the
step-0 forward-only evaluation. Every case also checks that the runtime's peak of
held activations equals the validator's.

Tensor parallelism (parameters compared as the logical tensors gathered over tp):
tp=2 and tp=4 at pp=1; pp=2 x tp=2 with every schedule; tied embeddings, Llama with
GQA (2 kv heads over tp=2: one per rank), recomputation, sequence parallelism, NCCL
semantics; pp=1 x dp=2 x tp=2; and pp=2 x dp=2 x tp=2 (8 ranks) with 1F1B and ZB-V.

Ragged targets (a different number of ignored targets in every sequence, so microbatches
and replicas count different target totals): the loss is normalised by the global count,
at pp 1 and 2, under dp=2 and under tp=2 (vocabulary-parallel cross-entropy).
"""

from __future__ import annotations

import itertools
from functools import cache

import pytest

from equivalence import (
    BATCH,
    POST_NORM_BERT,
    Case,
    assert_equivalent,
    reference,
    reference_of,
    run_pipeline_cases,
)

pytestmark = pytest.mark.multiprocess

SCHEDULES = ["gpipe", "1f1b"]
SPLIT_AND_VIRTUAL = ["interleaved-1f1b", "zb-h1", "zb-h2", "zb-v"]
V_SCHEDULES = ["dualpipev", "v-half", "v-min"]  # V placement; DualPipeV needs m >= 2p
FLAVOURS = ["gpt2", "llama"]


# B and I/W mixed in one schedule, and an overlapped F/B pair, at pp=2 with m=4
MIXED = (
    ("0F0", "0F1", "0I0", "0F2", "0B1", "0F3", "0I2", "0W0", "0B3", "0W2"),
    ("1F0", "1B0", "1F1", "(1F2;1I1)OVERLAP_F_B", "1B2", "1W1", "1F3", "1I3", "1W3"),
)


def _nccl_cases(pp: int) -> list[Case]:
    """Every schedule x microbatch count at ``pp`` under NCCL semantics; options rotate."""
    cases = []
    every = SCHEDULES + SPLIT_AND_VIRTUAL + V_SCHEDULES
    for sched, m in itertools.product(every, (1, 2, 3, 4, 8)):
        if sched == "dualpipev" and m < 2 * pp:
            m = 2 * pp if m == 1 else 0  # its smallest valid count stands in for m = 1
            if not m:
                continue
        flavour = FLAVOURS[(m + pp) % 2]
        cases.append(Case(sched, pp, m, recompute=m == 4, tied=m in (3, 8), flavour=flavour,
                          nccl=True, batch=8 if 8 % m == 0 else 6))
    return cases


def _cases(pp: int) -> list[Case]:
    if pp == 3:
        return _nccl_cases(3)
    cases = [] if pp == 1 else _nccl_cases(pp)
    if pp == 2:
        cases += [Case("mixed", 2, 4, custom=MIXED, tied=True),
                  Case("mixed", 2, 4, custom=MIXED, flavour="llama", recompute=True, nccl=True)]
        # selective recomputation (attention cores only), with split backward and rotary
        cases += [Case("1f1b", 2, 4, recompute="selective", tied=True),
                  Case("zb-h1", 2, 4, recompute="selective", flavour="llama", nccl=True)]
    if pp > 1:
        for sched, m, flavour in itertools.product(SPLIT_AND_VIRTUAL, (1, 4, 8), FLAVOURS):
            cases.append(Case(sched, pp, m, recompute=m == 4, tied=m == 8, flavour=flavour))
        cases.append(Case("interleaved-1f1b", pp, 4, virtual_stages=2 if pp == 4 else 3))
        for sched, m in itertools.product(V_SCHEDULES, sorted({2 * pp, 8})):
            cases.append(Case(sched, pp, m, recompute=m == 8, tied=m != 8, flavour=FLAVOURS[m % 3 % 2]))
    if pp == 4:  # the same 4 ranks as 2 stages x 2 data-parallel replicas
        cases += [Case("1f1b", 2, 2, dp=2), Case("zb-v", 2, 4, dp=2, tied=True, flavour="llama")]
        cases += [Case("mixed", 2, 4, custom=MIXED, dp=2, nccl=True),
                  Case("1f1b", 2, 4, dp=2, nccl=True),
                  Case("zb-v", 2, 2, dp=2, tied=True, flavour="llama", nccl=True)]
        # many small buckets (some issued mid-step), and the per-parameter path
        cases += [Case("1f1b", 2, 4, dp=2, tied=True, bucket_mb=0.01),
                  Case("zb-v", 2, 4, dp=2, flavour="llama", bucket_mb=0.01, nccl=True),
                  Case("1f1b", 2, 2, dp=2, tied=True, bucket_mb=0)]
        # ZeRO-1: each replica steps its half of every parameter, then all-gathers
        cases += [Case("1f1b", 2, 4, dp=2, tied=True, zero=1),
                  Case("zb-v", 2, 4, dp=2, tied=True, flavour="llama", zero=1, bucket_mb=0.01,
                       nccl=True)]
    for sched, m, flavour in itertools.product(SCHEDULES, (1, 2, 4, 8), FLAVOURS):
        # recompute and tying vary together with the microbatch count so that every
        # combination of them meets every schedule and flavour without a full product
        recompute = m in (2, 8)
        tied = m in (4, 8)
        cases.append(Case(sched, pp, m, recompute=recompute, tied=tied, flavour=flavour))
    return cases


def _tp_cases(world: int) -> list[Case]:
    """Tensor-parallel cases of ``world`` ranks; options rotate over the schedules."""
    if world == 2:  # tp=2 alone
        return [Case("1f1b", 1, 1, tp=2), Case("1f1b", 1, 2, tp=2, flavour="llama", tied=True),
                Case("gpipe", 1, 4, tp=2, recompute=True, tied=True),
                Case("1f1b", 1, 2, tp=2, flavour="llama", nccl=True),
                Case("1f1b", 1, 4, tp=2, sp=True, tied=True),
                Case("1f1b", 1, 2, tp=2, sp=True, flavour="llama", recompute=True),
                Case("1f1b", 1, 2, tp=2, sp=True, flavour="llama", recompute="selective"),
                Case("1f1b", 1, 2, tp=2, tied=True, vocab=61)]  # padded to 62
    if world == 8:  # dp x pp x tp, the full 3D grid, kept small: 8 ranks share 2 cores
        return [Case("1f1b", 2, 2, dp=2, tp=2, tied=True),
                Case("zb-v", 2, 4, dp=2, tp=2, flavour="llama", tied=True, nccl=True)]
    if world != 4:
        return []
    cases = [Case("1f1b", 1, 2, tp=4), Case("1f1b", 1, 2, tp=4, sp=True, tied=True),
             Case("zb-v", 2, 4, tp=2, tied=True, vocab=63, nccl=True),  # vocabulary padded
             Case("gpipe", 1, 2, tp=4, tied=True, vocab=63),
             Case("1f1b", 1, 2, dp=2, tp=2, flavour="llama", tied=True),
             Case("1f1b", 1, 2, dp=2, tp=2, sp=True, bucket_mb=0.01),  # SP sums per bucket
             # ZeRO-1 reduce-scatters tp shards, SP-summed, one parameter at a time
             Case("1f1b", 1, 2, dp=2, tp=2, sp=True, tied=True, zero=1, bucket_mb=0)]
    for i, sched in enumerate(SCHEDULES + SPLIT_AND_VIRTUAL + V_SCHEDULES):
        flavour = FLAVOURS[i % 2]
        cases.append(Case(sched, 2, 4, tp=2, flavour=flavour, tied=i % 3 != 1,
                          recompute=i % 3 == 2))
        # a second microbatch count, under NCCL semantics, sequence-parallel every other one
        m = 8 if sched == "dualpipev" else (1, 2, 3)[i % 3]
        cases.append(Case(sched, 2, m, tp=2, flavour=FLAVOURS[1 - i % 2], tied=i % 2 == 0,
                          nccl=True, sp=i % 2 == 1, batch=6 if m == 3 else BATCH))
    cases.append(Case("mixed", 2, 4, custom=MIXED, tp=2, flavour="llama", tied=True))
    return cases


def _ragged_cases(world: int) -> list[Case]:
    """Microbatches (and dp replicas) holding different target counts: global normalisation."""
    if world == 1:
        return [Case("1f1b", 1, 4, ragged=True)]
    if world == 2:
        return [Case("1f1b", 2, 4, ragged=True, tied=True),
                Case("zb-v", 2, 2, ragged=True, flavour="llama", nccl=True),
                Case("1f1b", 1, 2, tp=2, ragged=True, vocab=61)]  # vocabulary-parallel CE
    if world == 4:
        return [Case("interleaved-1f1b", 2, 2, dp=2, ragged=True),
                Case("1f1b", 2, 4, tp=2, ragged=True, tied=True, nccl=True)]
    return []


def _family_cases(world: int) -> list[Case]:
    """BERT (masked LM + NSP) and T5 (span corruption) at pp 1, 2 and 4 with gpipe, 1f1b,
    interleaved 1F1B and ZB-V, dp 2 and tp 2, full and selective recompute; T5 split so
    that one stage holds its last encoder layer, the bridge and its first decoder layer
    (partition ``params``)."""
    out = []
    for family, flavour in (("bert", "gpt2"), ("t5", "llama")):
        part = "params" if family == "t5" else "uniform"
        if world == 1:
            out.append(Case("1f1b", 1, 4, family=family, flavour=flavour))
        if world == 2:  # tensor parallelism: vocabulary-parallel heads, head-split attention
            out += [Case("1f1b", 1, 2, tp=2, family=family, flavour=flavour, tied=True),
                    Case("gpipe", 2, 4, family=family, flavour=flavour, partition=part),
                    Case("1f1b", 2, 2, family=family, flavour=flavour, tied=True),
                    Case("interleaved-1f1b", 2, 4, family=family, flavour=flavour, recompute=True),
                    Case("1f1b", 2, 4, family=family, flavour=flavour, recompute="selective"),
                    Case("zb-v", 2, 4, family=family, flavour=flavour, tied=True, nccl=True,
                         partition=part)]
        if world == 4:
            out += [Case("gpipe", 4, 2, family=family, flavour=flavour, tied=True),
                    Case("1f1b", 4, 4, family=family, flavour=flavour, partition=part),
                    Case("interleaved-1f1b", 4, 4, family=family, flavour=flavour, nccl=True),
                    Case("zb-v", 4, 8, family=family, flavour=flavour, tied=True),
                    Case("1f1b", 2, 4, dp=2, family=family, flavour=flavour, partition=part,
                         nccl=True),
                    Case("zb-v", 2, 4, tp=2, family=family, flavour=flavour, partition=part,
                         nccl=True, vocab=63)]  # vocabulary padded to 64
    return out


def _option_cases(world: int) -> list[Case]:
    """Model options: Hugging Face's BERT (post-norm, erf GELU, MLM decoder bias) at pp 1
    and 2; a post-norm decoder with a head bias under tp (the bias padded with the
    vocabulary); a post-norm T5 with a GeGLU MLP split at pp 2. And ``lend_cores`` on 2
    ranks (both cores lent at GPipe's turn and 1F1B's ends; a V placement's first F)."""
    if world == 1:
        return [Case("1f1b", 1, 4, family="bert", tied=True, options=POST_NORM_BERT)]
    if world == 2:
        return [Case("gpipe", 2, 4, lend=True), Case("1f1b", 2, 4, lend=True, nccl=True),
                Case("zb-v", 2, 4, lend=True, tied=True),
                Case("1f1b", 2, 2, family="bert", tied=True, nccl=True, options=POST_NORM_BERT),
                Case("1f1b", 1, 2, tp=2, tied=True, vocab=61, options=POST_NORM_BERT),
                Case("gpipe", 2, 4, family="t5", flavour="llama", partition="params",
                     options=(("norm_position", "post"), ("activation", "gelu_tanh")))]
    return []


def _finetune_cases(world: int) -> list[Case]:
    """Fine-tuning: a classifier for bert (pooled first token) and gpt (last real token), and
    seq2seq for t5 and gpt (prompt -> completion), at pp 1 and 2, and a classifier under
    tp 2 (its head is not split); unlabelled rows and ragged targets make the
    microbatches' target counts differ."""
    tasks = [("bert", "classify"), ("gpt", "classify"), ("t5", "seq2seq"), ("gpt", "seq2seq")]
    if world == 1:
        return [Case("1f1b", 1, 4, family=f, task=t) for f, t in tasks]
    if world == 2:
        return [Case("1f1b", 2, 4, family="bert", task="classify"),
                Case("zb-v", 2, 4, family="gpt", task="classify", flavour="llama", nccl=True),
                Case("gpipe", 2, 4, family="t5", task="seq2seq", partition="params"),
                Case("interleaved-1f1b", 2, 2, family="gpt", task="seq2seq", tied=True),
                Case("1f1b", 1, 2, tp=2, family="bert", task="classify")]  # a whole head under tp
    return []


WORLDS = (1, 2, 3, 4, 8)
# by world size: one spawned group each
CASES = {w: list({str(c): c for c in (_cases(w) if w < 8 else []) + _tp_cases(w)
                  + _ragged_cases(w) + _family_cases(w) + _option_cases(w)
                  + _finetune_cases(w)}.values())
         for w in WORLDS}


@cache
def _results(world: int) -> dict | Exception:
    # a failed group is remembered too, so its cases fail at once instead of relaunching
    try:
        return run_pipeline_cases(CASES[world], world=world)
    except Exception as err:  # noqa: BLE001 - reported by every case of this size
        return err


@cache
def _reference(case: Case) -> tuple:
    return reference(case)


@pytest.mark.parametrize("case", [c for world in WORLDS for c in CASES[world]], ids=str)
def test_matches_single_process(case: Case) -> None:
    world = case.world
    results = _results(world)
    if isinstance(results, Exception):
        pytest.fail(f"group of {world} ranks failed: {results}")
    got = results[str(case)]
    assert set(got) == set(range(world))
    assert_equivalent(case, got, _reference(reference_of(case)))
