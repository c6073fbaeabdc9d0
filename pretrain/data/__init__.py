"""Data pipeline: raw text -> tokenizer + packed webdataset shards -> resumable training batches."""

from pretrain.data.dataset import PackedDataset
from pretrain.data.loader import TrainLoader, val_batches
from pretrain.data.prepare import prepare_data
from pretrain.data.tokenizer import EOS_TOKEN, eos_id, load_tokenizer, train_tokenizer

__all__ = [
    "EOS_TOKEN",
    "PackedDataset",
    "TrainLoader",
    "eos_id",
    "load_tokenizer",
    "prepare_data",
    "train_tokenizer",
    "val_batches",
]
