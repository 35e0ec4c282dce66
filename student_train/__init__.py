"""The student side of logitcache: stream a cache, distil a student (never loads the teacher)."""
