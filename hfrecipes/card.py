"""The model card lives in the report layer (`hfrecipes.report.card`, its numbers in `report.lineage`, its
formatters in `report.format`). `write_card` stays importable from here for `inference`, which re-renders a folder's
card after generation.
"""

from hfrecipes.report.card import write_card

__all__ = ["write_card"]
