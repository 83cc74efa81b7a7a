"""Evaluation: perplexity, MMLU and multiple-choice reasoning."""
