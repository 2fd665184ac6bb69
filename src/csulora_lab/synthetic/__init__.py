"""The synthetic world: a small Llama trained from scratch on an instruction world made locally."""
