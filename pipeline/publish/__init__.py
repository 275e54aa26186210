"""Model publishing: versions of a model to ``model.updates``, a subscriber that rebuilds
them, and an on-disk export of a version (docs/publishing.md).

Modules: :mod:`.publisher`, :mod:`.subscriber`, :mod:`.export`, :mod:`.messages`,
:mod:`.serve` and :mod:`.predict` (reference HTTP serving);
the shard-side staging they rely on is :mod:`pipeline.ps.staging`.
"""
