"""Benchmarks: method components, whole training iterations, the semi-supervised synthetic benchmark."""
