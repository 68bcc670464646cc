"""Pipeline stages: one module per stage, their contract (stages/base.py) and the registry of their
names (stages/registry.py). Empty on purpose: a package's __init__ is part of the code identity of
every stage under it (artifacts/code.py), so registering a new stage must not live here.
"""
