"""Corpora, tokenizers, length distributions and global-batch sampling."""
