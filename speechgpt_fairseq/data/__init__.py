"""Vocabulary, datasets and binarization. Imports nothing from tasks, criterions or models."""
