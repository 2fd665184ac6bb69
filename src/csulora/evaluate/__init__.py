"""Safety and utility evaluation: prompts, batched greedy generation, judges and the lab's metrics."""
