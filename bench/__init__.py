"""Benchmarks of Flask-Offload against floors and peers: ``python -m bench --quick``."""
