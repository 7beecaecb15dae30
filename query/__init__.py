"""The query engine: query gradients, candidate search, exact rescoring, result formats, the shell."""
