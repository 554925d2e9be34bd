"""Audio input, sans-I/O: decode PCM, down-mix, resample, buffer and cut chunks."""
