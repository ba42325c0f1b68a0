"""RoBERTa / XLM-R adapter: BERT's module tree under a different base-model prefix.

RobertaSelfAttention reads attention_head_size (unchanged by head pruning) exactly as BERT's
does, so all slicing is inherited (an encoder, like BERT).
"""

from __future__ import annotations

from stages.arch.bert import BertAdapter


class RobertaAdapter(BertAdapter):
    family = "roberta"
    model_types = ("roberta", "xlm-roberta")
