"""Data: corpora, byte-level BPE tokenizer, packing into rows, and a resumable sampler.

Imports flow one way: errors and atomic are leaves; corpus <- tokenizer; packing and
sampler stand alone; prepare uses them all. ``batches`` and ``family_batches`` (masked
LM, span corruption: ``mlm`` and ``spans`` build them in numpy) are the only modules importing torch.
"""

from conveyor.data.batches import get_batch
from conveyor.data.corpus import Corpus, read_documents, resolve_paths, stdlib_corpus_paths
from conveyor.data.errors import DataError
from conveyor.data.packing import TokenDataset, pack, split_documents
from conveyor.data.prepare import PreparedData, prepare_data
from conveyor.data.sampler import Sampler
from conveyor.data.tokenizer import EOT, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "EOT",
    "Corpus",
    "DataError",
    "PreparedData",
    "Sampler",
    "TokenDataset",
    "Tokenizer",
    "get_batch",
    "load_tokenizer",
    "pack",
    "prepare_data",
    "read_documents",
    "resolve_paths",
    "split_documents",
    "stdlib_corpus_paths",
    "train_tokenizer",
]
