"""The lab: the paper's experiment in miniature, built locally and seeded (DESIGN.md section 3)."""
