"""Fake pruning and real pruning: channel groups, masks, compaction."""
