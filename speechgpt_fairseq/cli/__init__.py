"""The `speechgpt` command: one verb per job fairseq has no tool for."""
