"""Meters watch the engine: time, memory, energy, FLOPs, and the environment fingerprint.

Algorithms never import this package; the engine reads meters only at phase and epoch boundaries,
so no meter adds a host synchronisation to a training step.
"""
