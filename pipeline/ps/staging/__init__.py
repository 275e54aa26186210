"""Shard-side staging of published model versions (change tracking, chunks, requests).

Lives under ``ps`` because shard servers use it; the publisher and subscriber in
``pipeline.publish`` build on it (lower layers never import upper ones).
"""
