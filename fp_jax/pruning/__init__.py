"""Pruning by step: groups -> importance -> masks -> compaction; masked_update, bn_reestimate."""
