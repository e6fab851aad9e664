"""What a run leaves on disk and reads back: atomic checkpoints and resume."""
