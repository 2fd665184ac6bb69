"""The real-model study: SmolLM2-135M-Instruct, aligned, attacked and corrected on a CPU (docs/study.md)."""
