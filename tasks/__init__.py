"""tasks: one thin module per DVC stage, run as ``python -m tasks.<stage>``, and the helpers they share.

Set before any stage loads torch and its OpenMP runtime: an OpenMP thread without work spins for a while
before it sleeps, and on a machine whose other cores are busy that spinning takes the CPU from the threads
that have work, so pretraining beside one busy process ran many times slower. A short spin keeps the quiet
machine's speed.
"""
import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
