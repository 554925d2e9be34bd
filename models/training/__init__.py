"""Recipe for a small wav2vec2 CTC model trained from scratch on espeak-ng speech (see train.py)."""
