"""Inspection: `summary`, `explain`, `render`, the HLO collective parser and
`communication_report`. Read-only views of models, plans and programs."""
