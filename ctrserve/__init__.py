"""ctrserve: online inference for click-through-rate models.

The sub-packages live in the repository's top-level folders (see pyproject's package-dir):
``ctrserve.models`` (offline: data, layers, model zoo, training), ``ctrserve.export``,
``ctrserve.feature_store``, ``ctrserve.service`` (the gateway) and ``ctrserve.loadtests``.
"""

__version__ = "0.1.0"
