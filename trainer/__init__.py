"""mlmtrain: sentences -> WordPiece tokenizer -> token shards -> packed MLM pretraining -> HF export -> Hub."""

__version__ = "0.1.0"
