"""Text generation: sampling the next token, and KV-cached decoding in one process.

The pipelined version, one stage per rank, is :mod:`conveyor.runtime.generate`.
"""

from .decoding import CachedBlocks, check_prompt, context_budget, decode_loop, generate
from .sampling import GenerationError, check_sampling, sample_next
from .streaming import TextStream

__all__ = [
    "CachedBlocks",
    "GenerationError",
    "TextStream",
    "check_prompt",
    "check_sampling",
    "context_budget",
    "decode_loop",
    "generate",
    "sample_next",
]
