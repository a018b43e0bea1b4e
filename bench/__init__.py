"""Timing and memory benchmarks of the library and the app.

Run each as a module from the repository root (`python -m bench.live`), so the app's
packages import next to the installed `lems_core`; results go to bench/results/.
"""
