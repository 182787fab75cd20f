"""LoopServe: adaptive dual-phase inference acceleration for long multi-turn dialogues."""

__version__ = "0.1.0"
