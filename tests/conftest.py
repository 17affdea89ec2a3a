"""Nothing here on purpose.

casframe's tests use the fixtures of the shipped pytest plugin (``casframe.testing.plugin``,
loaded through its ``pytest11`` entry point) exactly as a third-party backend's tests would.
"""
