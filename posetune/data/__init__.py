"""Data: Unity Perception readers, the decoded-image cache and loader, per-node dataset fetch,
whole-dataset tools (check, push, synthesize) and the synthetic tutorial scene."""
