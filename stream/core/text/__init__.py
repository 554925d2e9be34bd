"""CTC text, sans-I/O: greedy and beam-search decoding stitched across chunks."""
