"""The batch build: corpus readers, chunking, factor fitting, the sharded resumable index build."""
