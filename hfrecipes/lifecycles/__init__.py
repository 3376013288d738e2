"""The lifecycle: a recipe of stages run in order, then evaluation, an honest control, export, inference, summary.

- `spec.py`     the lifecycle recipe as dataclasses, checked in full before anything runs (`hfrecipes check`)
- `runner.py`   runs or resumes the stages, evaluation, control, export and inference (`hfrecipes lifecycle`)
- `summary.py`  the summary table in the run folder, from the stage records and `cards/summary.md`

The API function is `hfrecipes.lifecycle(...)`; this package is `hfrecipes.lifecycles`, so importing one never
replaces the other on the package.
"""
