"""Evaluation: metrics, figures."""
