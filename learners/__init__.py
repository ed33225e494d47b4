"""aftertune.learners: how a model learns and is judged (base model, data, LoRA recipe, replay, EWC, evaluation)."""
