"""Prompt text to token ids: the CLIP BPE tokenizer (with its vocabulary in clip_vocab/) and prompt weights."""
