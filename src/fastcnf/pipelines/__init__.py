"""Workflows that chain runs of the one trainer: reflow and distillation (a teacher run's pairs,
then a student run). They sit above the training layer and below the command line."""
