"""The lung localiser: the box of both lungs on a film (learned segmenter, classical fallback) and its training."""
