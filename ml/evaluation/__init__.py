"""Evaluation: metrics with bootstrap intervals, the evaluation of models and baseline on held-out
patients (`radai evaluate`), the evaluation of follow-up on pairs with known truth, and the report
writer. Imports `ml.image`, `ml.runtime` (the baseline included) and `ml.data`; never
`ml.training`."""
