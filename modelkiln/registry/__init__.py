"""Where checkpoints come from (the directory registry) and how their formats are read safely."""
