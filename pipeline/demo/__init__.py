"""``pipeline demo``: the whole pipeline as local processes, with live progress and a report."""

from pipeline.demo.job import DemoSettings, run_demo

__all__ = ["DemoSettings", "run_demo"]
