"""The model card lives in the report layer (`hfrecipes.report.card`, its numbers in `report.lineage`, its
formatters in `report.format`). These names stay importable from here for `inference` (which re-renders a folder's
card after generation) and `lifecycles.claims` (`FORMATS`).
"""

from hfrecipes.report.card import OwnsCard, write_card
from hfrecipes.report.format import FORMATS

__all__ = ["FORMATS", "OwnsCard", "write_card"]
