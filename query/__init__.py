"""Answering queries (installed as ``attribdb.query``), one job per module:

- ``options``: what a caller asks, the queries and one ``QueryOptions``, checked once;
- ``batches``: batches of queries cut into chunks that fit memory, with progress;
- ``gradients``: a query's tokens, measurement gradient, row and (on need) inverse-HVP;
- ``store``: the shards' stored rows, records and FAISS indexes: candidates and stored-row scores;
- ``recompute``: rows' exact scores from their tokens, within a compute budget, and token contributions;
- ``scored``: a query's scored rows and how they rank into the top and the opponents;
- ``pipeline``: the one scoring pipeline those steps make, which every mode composes;
- ``engine``: the model and indexes loaded once, and the index, exact and exhaustive modes
  (``exhaustive`` holds the pass over every row);
- ``named``: where named documents rank for a query, and why;
- ``text``: BM25 text search, and BM25 as the prefilter of exact influence;
- ``results``, ``formats``, ``shell``, ``clock``: result objects, their output formats, the
  interactive shell, timings.
"""
