"""The report layer: every view of the numbers records hold, read and never recomputed elsewhere.

`lineage` (per-stage numbers and their totals, the serving cost a folder states), `format` (how a number reads),
`plots` (the PNGs a card or summary links) and `card` (the model card). It reads records and imports only leaves;
the lifecycle summary and `hfrecipes cost` read it too.
"""
