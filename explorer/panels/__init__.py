"""The page's sections; each renders from the workbench and leaves changes as requests (see actions.py)."""
