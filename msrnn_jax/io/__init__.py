"""Files: atomic writes and temporary folders, and saved states (orbax)."""
