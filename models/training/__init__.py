"""Recipe for a small wav2vec2 CTC model trained from scratch on synthetic speech (train.py)."""
