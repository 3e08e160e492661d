"""Training: data and augmentation, optimizers, schedules, the recipe, the trainer and its checkpoints."""
