"""attribdb: which training sequences made this model produce this completion?

An offline index-and-query database for training-data attribution with
EK-FAC influence functions (Grosse et al., 2023)::

    import attribdb
    db = attribdb.open("mydb")
    result = db.query("The capital of Vorlandia is", " Quessel", k=10)

The API is loaded on first use, so ``import attribdb`` (and the CLI's
``--help``) does not pay for importing torch.
"""

__version__ = "0.1.0"
__all__ = ["open", "build", "fit", "Database"]


def __getattr__(name: str):
    if name in __all__:
        from attribdb import api

        return getattr(api, name)
    raise AttributeError(f"module 'attribdb' has no attribute {name!r}")
