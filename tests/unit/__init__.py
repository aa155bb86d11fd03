"""Unit tests, one folder per package: one piece at a time, real files and databases where the piece
owns them, no running node, broker or worker."""
