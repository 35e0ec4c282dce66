"""Other tools' caches in and out. ``distillkit_codec``: DistillKit's compressed top-k log-probs and
bit-packed ids, read and written with numpy alone."""
