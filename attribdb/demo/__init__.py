"""The end-to-end demo: a corpus with traceable facts, a tiny model trained on it, a database, queries."""
