"""The contract between the offline path (``models``, ``export``) and the online path
(``feature_store``, ``service``): what a prepared dataset and an exported model hand over.

- ``feature_map``: every model input (kind, side, dtype, vocabulary size, embedding table,
  density statistics) and the behaviour sequences; PAD=0 and OOV=1 ids;
- ``vocab``: raw categorical values -> ids;
- ``transforms``: the dense normalisation and the quantile buckets;
- ``manifest``: one exported model version (wire inputs, output, parity, store namespace);
- ``store_schema``: what the online store keeps per user and per item.

No torch and no pandas here (``tests/test_layout.py`` checks the import graph): the serving image
reads the contract without the training stack.
"""
