"""``pipeline demo``: the whole pipeline as local processes, with live progress and a report."""

from pipeline.demo.job import DemoError, DemoSettings, run_demo

__all__ = ["DemoError", "DemoSettings", "run_demo"]
