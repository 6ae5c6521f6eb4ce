"""Learners: models, losses and updates."""
