"""attribdb: which training sequences made this model produce this completion?

An offline index-and-query database for training-data attribution with
EK-FAC influence functions (Grosse et al., 2023).
"""

__version__ = "0.1.0"
