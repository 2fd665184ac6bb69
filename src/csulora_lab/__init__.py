"""The lab: the paper's experiment in miniature, built locally and seeded (see the README's quick start)."""
