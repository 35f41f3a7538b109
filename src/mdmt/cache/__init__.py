"""The image cache: each film preprocessed once (decode, clip, lung crop, resize) into a memory-mapped array."""
