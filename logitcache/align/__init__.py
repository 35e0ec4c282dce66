"""Aligning two tokenizations of the same text: what a token is as bytes (``token_bytes``), which
teacher ids are student ids (``vocab_map``), and which student positions meet a teacher position at
the same byte boundary (``spans``). Used by cross-tokenizer distillation (``student_train.cross_tokenizer``)
and ``logitcache inspect --student-tokenizer``."""

from .retokenize import Retokenizer, load_tokenizer, messages_of
from .spans import Alignment, align_tokens, matching_blocks
from .token_bytes import TokenBytes
from .vocab_map import VocabMap

__all__ = ["Alignment", "Retokenizer", "load_tokenizer", "messages_of", "TokenBytes", "VocabMap", "align_tokens", "matching_blocks"]
