"""The serving benchmark (`make bench`, or `python -m bench`): docs/performance.md."""
